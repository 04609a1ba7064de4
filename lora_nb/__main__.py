"""Command line: `python -m lora_nb run [...]` (also the `lora-nb` console script).

    python -m lora_nb run                                  # demo model, demo data, demo-cpu preset
    python -m lora_nb run --config my.yaml --out runs/mine # the kit's YAML or an axolotl config
    python -m lora_nb run --model path/to/model --data train.jsonl --heldout test.jsonl
    python -m lora_nb launch --gpus 4 --config my.yaml     # prints the `accelerate launch` command (DDP)
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .errors import LoraNbError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-nb", description="LoRA/QLoRA fine-tuning kit.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="load -> configure -> train -> evaluate, into one run folder")
    run.add_argument("--config", help="settings file: the kit's YAML or an axolotl config (default: the preset)")
    run.add_argument("--preset", default="demo-cpu", help="preset used without --config (default: demo-cpu)")
    run.add_argument("--model", help="base model hub ID or folder (default: from the settings, the demo model)")
    run.add_argument("--data", help="training examples .jsonl/.json/.csv (default: the demo task's)")
    run.add_argument("--heldout", help="held-out examples (default: the demo task's)")
    run.add_argument("--out", help="run folder to write (default: a new runs/demo-<date>-<time>/)")
    run.add_argument("--quant", choices=["4bit", "8bit", "none"], help="override quant.load_in")
    run.add_argument("--max-steps", type=int, help="override train.max_steps")
    run.add_argument("--limit", type=int, help="evaluate on the first N held-out examples only")
    run.add_argument("--max-new-tokens", type=int, default=40, help="longest generated answer (default: 40)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    launch = sub.add_parser("launch", help="print the `accelerate launch` command that runs `run` on N GPUs "
                            "(data parallel); the other arguments are passed to `run`")
    launch.add_argument("--gpus", type=int, default=2, help="number of processes, one per GPU (default: 2)")
    launch.add_argument("--cpu", action="store_true", help="N processes on the CPU (gloo) instead of GPUs")
    launch.add_argument("--accelerate-config", help="an accelerate config file (FSDP, DeepSpeed, several machines)")
    return parser


def _print_launch(parser: argparse.ArgumentParser, args: argparse.Namespace, run_args: list[str]) -> int:
    """Check the `run` arguments, then print the launch command."""
    from .launch import format_command, launch_command

    parser.parse_args(["run", *run_args])  # a misspelled run argument fails here, not in N processes
    print(format_command(launch_command(args.gpus, run_args, cpu=args.cpu,
                                        accelerate_config=args.accelerate_config)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a problem the kit explains, 130 Ctrl+C)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "launch":
        try:
            return _print_launch(parser, args, extra)
        except LoraNbError as err:
            print(f"lora-nb: {err}", file=sys.stderr)
            return 1
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.resume and not args.out:
        parser.error("--resume needs --out: the run folder to continue")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from .pipeline import run_pipeline
    from .runs import new_run_dir

    try:
        out = args.out or new_run_dir("runs", "demo")
        run_pipeline(args.config, model=args.model, data=args.data, heldout=args.heldout, out=out,
                     preset=args.preset, quant=args.quant, max_steps=args.max_steps, limit=args.limit,
                     max_new_tokens=args.max_new_tokens, resume=args.resume)
    except LoraNbError as err:  # the kit's errors already say what to do: no stack trace
        print(f"lora-nb: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lora-nb: interrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
