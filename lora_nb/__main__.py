"""Command line: `python -m lora_nb run [...]` (also the `lora-nb` console script).

    python -m lora_nb run                                  # demo model, demo data, demo-cpu preset
    python -m lora_nb run --config my.yaml --out runs/mine # the kit's YAML or an axolotl config
    python -m lora_nb run --model path/to/model --data train.jsonl --heldout test.jsonl
    python -m lora_nb fit meta-llama/Llama-3.1-8B --gpu T4  # will it fit? (shipped configs work offline)
    python -m lora_nb gpu-check                            # train a few steps on this GPU and report
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
    _add_fit_parser(sub)
    check = sub.add_parser("gpu-check", help="train a few 4-bit steps on this GPU (random-weight 1B and 3B Llama "
                           "shapes, offline) and write a Markdown + JSON report; a smoke version without CUDA")
    check.add_argument("--out", default="gpu-check", help="folder for gpu_check.md and gpu_check.json (default: gpu-check)")
    check.add_argument("--steps", type=int, help="optimizer steps per variant (default 8 on a GPU, 3 in the smoke version)")
    return parser


def _add_fit_parser(sub) -> None:
    fit = sub.add_parser("fit", help="will a LoRA run of this model fit on this GPU? (config only, no weights)")
    fit.add_argument("model", help="hub ID (shipped configs work offline), config.json or model folder")
    fit.add_argument("--gpu", help="T4, L4, A10G, RTX3090, RTX4090, A100-40, A100-80, H100, H200")
    fit.add_argument("--memory", type=float, help="the GPU's memory in GiB, instead of --gpu")
    fit.add_argument("--config", help="the kit's settings file (default: the kit's defaults)")
    fit.add_argument("--batch", type=int, help="examples per step (default: from the settings, 4)")
    fit.add_argument("--seq", type=int, help="tokens per example (default: max_seq_length, 512)")
    fit.add_argument("--quant", choices=["4bit", "8bit", "none"], help="override quant.load_in")
    fit.add_argument("--r", type=int, help="override lora.r")
    fit.add_argument("--dora", action="store_true", help="use DoRA")
    fit.add_argument("--checkpointing", action="store_true", help="turn on gradient checkpointing")
    fit.add_argument("--optim", help="override train.optim (e.g. paged_adamw_8bit)")


def _fit(args) -> None:
    from .fit import plan_fit
    from .formats import load_settings
    from .settings import KitSettings

    settings = load_settings(args.config).settings if args.config else KitSettings()
    if args.quant:
        settings.quant.load_in = args.quant
    if args.r:
        settings.lora.r = args.r
    if args.dora:
        settings.lora.use_dora = True
    if args.checkpointing:
        settings.train.gradient_checkpointing = True
    if args.optim:
        settings.train.optim = args.optim
    settings.check(check_environment=False)
    print(plan_fit(args.model, args.gpu, args.memory, settings, args.batch, args.seq))


def _planning_command(args) -> int:
    """`fit` and `gpu-check`: the kit's errors become one line and exit status 1."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        (_fit if args.command == "fit" else _gpu_check)(args)
    except LoraNbError as err:
        print(f"lora-nb: {err}", file=sys.stderr)
        return 1
    return 0


def _gpu_check(args) -> None:
    from .gpu_check import run_gpu_check

    report = run_gpu_check(args.out, steps=args.steps)
    print(report.markdown())
    print(f"written: {args.out}/gpu_check.md and gpu_check.json")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a problem the kit explains, 130 Ctrl+C)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in ("fit", "gpu-check"):
        return _planning_command(args)
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
