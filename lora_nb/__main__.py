"""Command line: `python -m lora_nb run [...]` (also the `lora-nb` console script).

    python -m lora_nb run                                  # demo model, demo data, demo-cpu preset
    python -m lora_nb run --config my.yaml --out runs/mine # the kit's YAML or an axolotl config
    python -m lora_nb run --model path/to/model --data train.jsonl --heldout test.jsonl
    python -m lora_nb run --preset qlora-walkthrough --r 16 --alpha 32 --lr 2e-4 --steps 40
    python -m lora_nb launch --gpus 4 --config my.yaml     # prints the `accelerate launch` command (DDP)
    python -m lora_nb fit meta-llama/Llama-3.1-8B --gpu T4  # will it fit? (shipped configs work offline)
    python -m lora_nb gpu-check                            # train a few steps on this GPU and report

Every argument is checked before the model is loaded (`lora_nb.arguments`, the settings' own
checks): an empty `--data "$UNSET"` is refused rather than read as "the demo data".
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from typing import Any

from .arguments import check_run_arguments
from .errors import LoraNbError
from .fit import plan_fit
from .formats import load_settings
from .launch import format_command, launch_command
from .presets import PRESETS
from .run_folder import new_run_dir
from .settings import SECTIONS, GenerationSettings, KitSettings, field_specs

# Short command-line overrides: option -> (section, field). Type, choices and help come from the field.
OVERRIDES = {"r": ("lora", "r"), "alpha": ("lora", "lora_alpha"), "lr": ("train", "learning_rate"),
             "steps": ("train", "max_steps")}
FIT_OVERRIDES = {"quant": ("quant", "load_in"), "r": ("lora", "r"), "dora": ("lora", "use_dora"),
                 "checkpointing": ("train", "gradient_checkpointing"), "optim": ("train", "optim")}
_EXAMPLES = """\
examples:
  lora-nb run                                        demo model, demo data, demo-cpu preset (about a minute on CPU)
  lora-nb run --preset qlora-walkthrough --steps 40  another preset, 40 optimizer steps
  lora-nb run --r 8 --alpha 16 --lr 5e-4             the preset with a few settings changed
  lora-nb run --config my.yaml --out runs/mine       the kit's YAML or an axolotl config
  lora-nb run --model path/to/model --data train.jsonl --heldout test.jsonl --limit 20
  lora-nb run --out runs/mine --resume               continue an interrupted run
"""


def _spec(section: str, name: str):
    cls = SECTIONS[section] if section else KitSettings
    return next(s for s in field_specs(cls) if s.name == name)


def _epilog() -> str:
    lines = ["presets (--preset NAME):"]
    for name, preset in PRESETS.items():
        lines += textwrap.wrap(preset.description, width=100, initial_indent=f"  {name:<24} ",
                               subsequent_indent=" " * 27)
    return "\n".join(lines) + "\n\n" + _EXAMPLES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-nb", description="LoRA/QLoRA fine-tuning kit.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="load -> configure -> train -> evaluate, into one run folder",
                         description="Load a model, configure LoRA, train, and evaluate, into one run folder.",
                         epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", help="settings file: the kit's YAML or an axolotl config (default: the preset)")
    run.add_argument("--preset", default="demo-cpu", help="preset used without --config (default: demo-cpu; "
                                                          "listed below)")
    run.add_argument("--model", help="base model hub ID or folder (default: from the settings, the demo model)")
    run.add_argument("--data", help="training examples .jsonl/.json/.csv (default: the demo task's)")
    run.add_argument("--heldout", help="held-out examples (default: the demo task's)")
    run.add_argument("--out", help="run folder to write (default: a new runs/demo-<date>-<time>/)")
    run.add_argument("--quant", choices=_spec("quant", "load_in").choices, help="override quant.load_in")
    _add_overrides(run, OVERRIDES)
    for name in ("limit", "max_new_tokens"):
        spec = next(s for s in field_specs(GenerationSettings) if s.name == name)
        run.add_argument(f"--{name.replace('_', '-')}", type=int, default=spec.default,
                         help=f"{spec.help} (default: {spec.default if spec.default is not None else 'all'})")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    launch = sub.add_parser("launch", help="print the `accelerate launch` command that runs `run` on N GPUs "
                            "(data parallel); the other arguments are passed to `run`")
    launch.add_argument("--gpus", type=int, default=2, help="number of processes, one per GPU (default: 2)")
    launch.add_argument("--cpu", action="store_true", help="N processes on the CPU (gloo) instead of GPUs")
    launch.add_argument("--accelerate-config", help="an accelerate config file (FSDP, DeepSpeed, several machines)")
    _add_fit_parser(sub)
    check = sub.add_parser("gpu-check", help="train a few 4-bit steps on this GPU (random-weight 1B and 3B Llama "
                           "shapes, offline) and write a Markdown + JSON report; a smoke version without CUDA")
    check.add_argument("--out", default="gpu-check", help="folder for gpu_check.md and gpu_check.json (default: gpu-check)")
    check.add_argument("--steps", type=int, help="optimizer steps per variant (default 20 on a GPU, 3 in the smoke version)")
    return parser


def _add_overrides(parser: argparse.ArgumentParser, table: dict[str, tuple[str, str]]) -> None:
    """One option per entry of `table`, typed and explained by the settings field it overrides."""
    for option, (section, name) in table.items():
        spec = _spec(section, name)
        flags = [f"--{option}"] + (["--max-steps"] if name == "max_steps" else [])
        explained = f"{section}.{name}: {spec.help}".replace("%", "%%")  # argparse formats help with %
        if spec.type is bool:
            parser.add_argument(*flags, dest=option, action="store_const", const=True, help=f"turn on {explained}")
        elif spec.choices:
            parser.add_argument(*flags, dest=option, choices=spec.choices, help=f"override {explained}")
        else:
            parser.add_argument(*flags, dest=option, type=spec.type, metavar=spec.type.__name__.upper(),
                                help=f"override {explained}")


def _overrides(args: argparse.Namespace, table: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The options of `table` that were given, by `section.field` name."""
    return {f"{section}.{name}": getattr(args, option)
            for option, (section, name) in table.items() if getattr(args, option) is not None}


def _print_launch(parser: argparse.ArgumentParser, args: argparse.Namespace, run_args: list[str]) -> int:
    """Check the `run` arguments, then print the launch command."""
    parser.parse_args(["run", *run_args])  # a misspelled run argument fails here, not in N processes
    print(format_command(launch_command(args.gpus, run_args, cpu=args.cpu,
                                        accelerate_config=args.accelerate_config)))
    return 0


def _add_fit_parser(sub) -> None:
    fit = sub.add_parser("fit", help="will a LoRA run of this model fit on this GPU? (config only, no weights)")
    fit.add_argument("model", help="hub ID (shipped configs work offline), config.json or model folder")
    fit.add_argument("--gpu", help="T4, L4, A10G, RTX3090, RTX4090, A100-40, A100-80, H100, H200")
    fit.add_argument("--memory", type=float, help="the GPU's memory in GiB, instead of --gpu")
    fit.add_argument("--config", help="the kit's settings file (default: the kit's defaults)")
    fit.add_argument("--batch", type=int, help="examples per step (default: from the settings, 4)")
    fit.add_argument("--seq", type=int, help="tokens per example (default: max_seq_length, 512)")
    _add_overrides(fit, FIT_OVERRIDES)


def _fit(args) -> None:
    settings = load_settings(args.config).settings if args.config else KitSettings()
    settings.override(_overrides(args, FIT_OVERRIDES))
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
    from .gpu_check import run_gpu_check  # trains tiny models: imports peft and datasets, only for this command

    report = run_gpu_check(args.out, steps=args.steps)
    print(report.markdown())
    print(f"written: {args.out}/gpu_check.md and gpu_check.json")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a problem the kit explains, 130 Ctrl+C).

    Args:
        argv: The arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status.
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "launch":  # only `launch` passes its other arguments on (to `run`)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("fit", "gpu-check"):
        return _planning_command(args)
    if args.command == "launch":
        try:
            return _print_launch(parser, args, extra)
        except LoraNbError as err:
            print(f"lora-nb: {err}", file=sys.stderr)
            return 1
    if args.resume and not args.out:
        parser.error("--resume needs --out: the run folder to continue")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from .pipeline import run_pipeline  # every stage (peft, datasets, matplotlib): not for --help, fit or launch

    overrides = _overrides(args, OVERRIDES)
    try:
        check_run_arguments(config=args.config, preset=args.preset, model=args.model, data=args.data,
                            heldout=args.heldout, out=args.out, max_new_tokens=args.max_new_tokens, limit=args.limit)
        out = args.out if args.out is not None else new_run_dir("runs", "demo")
        run_pipeline(args.config, model=args.model, data=args.data, heldout=args.heldout, out=out,
                     preset=args.preset, quant=args.quant, overrides=overrides, limit=args.limit,
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
