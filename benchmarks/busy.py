"""Speed on a busy machine: the demo's training alone, then beside one competing busy process.

A workshop laptop runs a browser and a video call beside the notebook. This benchmark times a
short but representative run of the demo (the demo model, the demo data, the ``demo-cpu`` preset,
``--steps`` optimizer steps, no evaluation) four ways, alternating so that the machine's own noise
falls on every variant alike:

    quiet, before   LORA_NB_THREADS=off: torch and OpenMP as they come (threads spin when idle)
    quiet, after    the kit's thread settings (lora_nb/threads.py)
    busy,  before   the same, while one other process keeps one core busy
    busy,  after

and prints each time, and the ratio busy / quiet for "before" and "after" (target: <= 2.5x).
Each run is a fresh process, as on the command line. Run it alone on the machine
(``flock /tmp/heavy.lock python benchmarks/busy.py``); it takes a few minutes.

    python benchmarks/busy.py [--steps 4] [--repeats 2] [--json benchmarks/results/busy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUSY = "while True: pass"  # one core at 100%, like a video call or a browser tab running scripts
VARIANTS = (("quiet", "before"), ("quiet", "after"), ("busy", "before"), ("busy", "after"))


def worker(steps: int) -> None:
    """One timed training run (what each measured process does); prints its seconds as JSON."""
    started = time.perf_counter()
    import lora_nb
    from lora_nb.demo_task import demo_data_paths
    from lora_nb.loading import load_model
    from lora_nb.presets import get_preset
    from lora_nb.train import train

    settings = get_preset("demo-cpu")
    settings.train.max_steps = steps
    settings.train.save_steps = None
    model, tokenizer = load_model(settings.model_name_or_path, settings.quant)
    train_path, _ = demo_data_paths()
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        result = train(model, tokenizer, train_path, settings, Path(out) / "run")
        train_s = time.perf_counter() - t
    print(json.dumps({"train_s": train_s, "total_s": time.perf_counter() - started, "steps": result.global_step,
                      "cpu_s": os.times().user + os.times().system, "threads": lora_nb.thread_report()}))


def measure(load: str, variant: str, steps: int) -> dict:
    """Runs one worker process, with a busy competitor when ``load == "busy"``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    if variant == "before":
        env["LORA_NB_THREADS"] = "off"
        for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "TOKENIZERS_PARALLELISM"):
            env.pop(name, None)
    competitor = subprocess.Popen([sys.executable, "-c", BUSY]) if load == "busy" else None
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(steps)], env=env,
                             capture_output=True, text=True, check=True).stdout
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default: 4)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the four variants (default: 2)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps)
        return
    runs: dict[tuple[str, str], list[dict]] = {v: [] for v in VARIANTS}
    for round_ in range(args.repeats):
        for load, variant in VARIANTS:
            result = measure(load, variant, args.steps)
            runs[(load, variant)].append(result)
            print(f"round {round_ + 1}: {load:5} {variant:6} train {result['train_s']:6.1f} s, "
                  f"process {result['total_s']:6.1f} s, CPU {result['cpu_s']:6.1f} s", flush=True)
    median = {v: statistics.median(r["train_s"] for r in rs) for v, rs in runs.items()}
    summary = {}
    for variant in ("before", "after"):
        quiet, busy = median[("quiet", variant)], median[("busy", variant)]
        summary[variant] = {"quiet_s": round(quiet, 1), "busy_s": round(busy, 1), "ratio": round(busy / quiet, 2)}
        print(f"{variant:6}: quiet {quiet:6.1f} s, with one busy process {busy:6.1f} s -> {busy / quiet:.2f}x")
    print(runs[("quiet", "after")][0]["threads"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"steps": args.steps, "repeats": args.repeats, "summary": summary,
                                               "runs": {f"{l}-{v}": r for (l, v), r in runs.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
