"""Benchmark: peak training memory measured beside `lora_nb.estimate.estimate_memory`, over a grid.

Each grid point runs two real training steps through the kit's own path (`loading.load_model`,
`train.train`: peft wrap, `Trainer`, the kit's collator, AdamW) in a fresh Python process, on
batches of exactly `batch x seq` tokens, and records the peak:

- CPU: the peak resident set size (VmHWM) of the training steps minus the RSS after importing
  torch/transformers/peft (the libraries are not part of the estimate). The peak is reset after the
  model is loaded (``/proc/self/clear_refs``), so loading transients do not count. The weights are
  copied out of the safetensors memory map first (file-backed pages can be evicted when the machine is
  short of memory, and would then be missing from RSS; on a GPU they are copied anyway). glibc's malloc is
  pinned to one arena and a fixed mmap threshold (128 KiB), so freed tensors go back to the system at
  once: RSS then follows live memory, as CUDA's ``max_memory_allocated`` does on a GPU.
- CUDA: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over loading and training.

The grid is one factor at a time around a base point (demo model, LoRA r 8 on all linear layers,
dropout 0, batch 4 x 128 tokens, fp32, no quantization, AdamW): batch x length shapes, DoRA,
attention-only and MLP-only targets, r 64, gradient checkpointing, bf16, 4-bit NF4, dropout 0.1.
Measurements go to ``memory_raw.json``; the estimate is recomputed from them by the current code
(``--rescore``), so that tuning the estimate needs no new measurements.

    python benchmarks/memory.py                    # demo model on CPU: 40 min on 2 busy shared cores
    python benchmarks/memory.py --rescore          # recompute estimates, table and plot only
    python benchmarks/memory.py --model tiny --points base,dora --out /tmp/x   # seconds, for tests
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.models import model_folder  # noqa: E402
RESULTS_DIR = Path(__file__).parent / "results"
RAW_FILE = "memory_raw.json"
MMAP_THRESHOLD = 128 * 1024  # glibc's default, pinned: larger blocks are mmapped and unmapped on free

BASE = {"batch": 4, "seq": 128, "targets": "all-linear", "r": 8, "dora": False, "dropout": 0.0,
        "checkpointing": False, "precision": "fp32", "quant": "none", "optim": "adamw_torch"}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
GRID = {  # name -> change from BASE
    "1x64": {"batch": 1, "seq": 64},
    "4x64": {"seq": 64},
    "base": {},
    "8x128": {"batch": 8},
    "4x256": {"seq": 256},
    "dora": {"dora": True},
    "attention": {"targets": ATTENTION},
    "mlp": {"targets": MLP},
    "r64": {"r": 64},
    "checkpointing": {"checkpointing": True},
    "bf16": {"precision": "bf16"},
    "4bit": {"quant": "4bit"},
    "dropout": {"dropout": 0.1},
}


def point_settings(point: dict, model_path: str = ""):
    """The kit's settings for a grid point (two steps, no checkpoints, every token trained)."""
    from lora_nb.settings import KitSettings, LoraSettings, QuantSettings, TrainSettings

    return KitSettings(
        model_name_or_path=model_path,
        lora=LoraSettings(r=point["r"], lora_alpha=2 * point["r"], lora_dropout=point["dropout"],
                          target_modules=point["targets"], use_dora=point["dora"]),
        quant=QuantSettings(load_in=point["quant"], bnb_4bit_compute_dtype="float32" if point["precision"] == "fp32"
                            else "bfloat16"),
        train=TrainSettings(max_steps=2, per_device_train_batch_size=point["batch"], max_seq_length=point["seq"],
                            precision=point["precision"], gradient_checkpointing=point["checkpointing"],
                            optim=point["optim"], save_steps=None, logging_steps=1, learning_rate=1e-3,
                            group_by_length=False, train_on_responses_only=False))


# --------------------------------------------------------------------------------------------- child
def _malloc_setup() -> None:
    """glibc only: one heap arena and a fixed mmap threshold, so that RSS follows live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 1)  # M_ARENA_MAX
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (also turns off its dynamic growth)
    except (OSError, AttributeError):
        pass


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _reset_peak_rss() -> None:
    """Linux: let VmHWM start again from the current RSS (writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_point(point: dict, model_path: str, threads: int = 2) -> dict:
    """Two training steps of one grid point in this process; returns the measured peaks in bytes.

    Call it in a fresh process (``python benchmarks/memory.py --child``): the peaks are per process.
    """
    _malloc_setup()
    import gc

    import datasets
    import torch
    import transformers  # noqa: F401  (imported before the baseline: the libraries are not estimated)
    import peft  # noqa: F401

    from lora_nb.loading import load_model
    from lora_nb.train import train

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    base_rss = _status_kib("VmRSS") * 1024
    settings = point_settings(point, model_path)
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float32"}[point["precision"]]
    if not cuda and point["precision"] != "fp32":
        dtype = "float32"  # the kit's CPU path: fp32 weights, autocast for bf16
    model, tokenizer = load_model(model_path, settings.quant, dtype=dtype,
                                  gradient_checkpointing=point["checkpointing"])
    with torch.no_grad():  # out of the safetensors memory map: file pages can be evicted under memory pressure
        for param in model.parameters():
            if param.device.type == "cpu" and type(param).__name__ == "Parameter":
                param.data = param.data.clone()
    gc.collect()
    _trim()
    loaded_rss = _status_kib("VmRSS") * 1024
    _reset_peak_rss()
    b, s = point["batch"], point["seq"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(1000, model.config.vocab_size), (2 * b, s), generator=gen).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        result = train(model, tokenizer, data, settings, Path(run_dir) / "run")
        seconds = time.perf_counter() - started
    row = {"peak_rss": _status_kib("VmHWM") * 1024 - base_rss, "base_rss": base_rss,
           "loaded_rss": loaded_rss - base_rss, "seconds": seconds, "loss": result.final_loss,
           "device": "cuda" if cuda else "cpu"}
    if cuda:
        row |= {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
                "gpu": torch.cuda.get_device_name()}
    return row


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -------------------------------------------------------------------------------------------- parent
def run_grid(model: str, names: list[str], threads: int, workdir: Path) -> list[dict]:
    """Each grid point in a fresh process; returns one row per point with its measured peaks."""
    path = model_folder(model, workdir)
    rows = []
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    for name in names:
        point = BASE | GRID[name]
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(point), path, str(threads)],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            rows.append({"name": name, "point": point, "error": out.stderr.strip().splitlines()[-1]})
            print(f"  {name}: failed: {rows[-1]['error']}", flush=True)
            continue
        rows.append({"name": name, "point": point} | json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {name}: peak {rows[-1]['peak_rss'] / 2**20:.0f} MiB in {rows[-1]['seconds']:.0f} s", flush=True)
    return rows


def score(raw: dict) -> list[dict]:
    """Adds the current code's estimate to every measured row."""
    import transformers

    from lora_nb.estimate import estimate_memory

    values = dict(raw["config"])
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    rows = []
    for row in raw["rows"]:
        if "error" in row:
            continue
        point = row["point"]
        est = estimate_memory(config, point_settings(point), point["batch"], point["seq"], device=row["device"])
        measured = row.get("allocated", row["peak_rss"])
        rows.append(row | {"estimate": est.total_bytes, "measured": measured, "ratio": est.total_bytes / measured,
                           "parts": dict(est.parts)})
    return rows


def write_results(raw: dict, rows: list[dict], out_dir: Path) -> None:
    """memory_grid.csv, memory_grid.md and memory_grid.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    part_names = list(dict.fromkeys(k for r in rows for k in r["parts"]))  # checkpointing has other parts
    with open(out_dir / "memory_grid.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "batch", "seq", "targets", "r", "dora", "dropout", "checkpointing", "precision",
                         "quant", "estimate_mib", "measured_mib", "estimate_over_measured"]
                        + [f"{p}_mib" for p in part_names])
        for r in rows:
            p = r["point"]
            targets = p["targets"] if isinstance(p["targets"], str) else "+".join(p["targets"])
            writer.writerow([r["name"], p["batch"], p["seq"], targets, p["r"], p["dora"], p["dropout"],
                             p["checkpointing"], p["precision"], p["quant"], f"{r['estimate'] / 2**20:.1f}",
                             f"{r['measured'] / 2**20:.1f}", f"{r['ratio']:.3f}"]
                            + [f"{r['parts'].get(k, 0) / 2**20:.1f}" for k in part_names])
    (out_dir / "memory_grid.md").write_text(_markdown(raw, rows, part_names))
    _plot(rows, out_dir / "memory_grid.png")


def _markdown(raw: dict, rows: list[dict], part_names: list[str]) -> str:
    ratios = [r["ratio"] for r in rows]
    lines = [
        "# Training memory: `estimate_memory` vs measured",
        "",
        f"Model `{raw['model']}` on {raw['device']} ({raw['machine']}), torch {raw['torch']}, transformers "
        f"{raw['transformers']}, peft {raw['peft']}; {raw['threads']} torch threads; measured {raw['date']}.",
        "Base point: LoRA r 8 on all linear layers, dropout 0, batch 4 x 128 tokens, fp32, no quantization, "
        "AdamW; every other row changes one thing. Two training steps through the kit's `train()` in a fresh "
        "process per row.",
        "",
        "Measured = " + ("peak RSS of the training steps minus the RSS after importing the libraries "
                         "(glibc: one arena, mmap threshold pinned at 128 KiB, so freed tensors leave RSS)."
                         if raw["device"] == "cpu" else "`torch.cuda.max_memory_allocated`."),
        "",
        "| point | batch x seq | change | estimate MiB | measured MiB | estimate / measured |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        p = r["point"]
        change = ", ".join(f"{k} {v if not isinstance(v, list) else '+'.join(v)}" for k, v in GRID[r["name"]].items()
                           if k not in ("batch", "seq")) or "-"
        lines.append(f"| {r['name']} | {p['batch']} x {p['seq']} | {change} | {r['estimate'] / 2**20:.0f} | "
                     f"{r['measured'] / 2**20:.0f} | {r['ratio']:.2f} |")
    if ratios:
        lines += ["", f"estimate / measured: min {min(ratios):.2f}, max {max(ratios):.2f} over {len(ratios)} points "
                      "(target 0.90-1.15, never under 0.90)."]
    failed = [r for r in raw["rows"] if "error" in r]
    lines += [f"- {r['name']} did not run: {r['error']}" for r in failed]
    lines += ["", "Estimate parts (MiB):", "", "| point | " + " | ".join(part_names) + " |",
              "|" + " --- |" * (len(part_names) + 1)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['parts'].get(k, 0) / 2**20:.0f}" for k in part_names) + " |")
    lines += ["", "![memory](memory_grid.png)", "", f"Reproduce: `{raw['command']}`", ""]
    return "\n".join(lines)


def _plot(rows: list[dict], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["estimate"] / 2**20 for r in rows], 0.4, label="estimate")
    ax.bar([i + 0.2 for i in x], [r["measured"] / 2**20 for r in rows], 0.4, label="measured")
    for i, r in enumerate(rows):
        ax.text(i, max(r["estimate"], r["measured"]) / 2**20, f"{r['ratio']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [r["name"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Training memory: estimate vs measured (ratio above each pair)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, tiny or a model folder")
    parser.add_argument("--points", default=",".join(GRID), help="comma-separated grid points")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the results")
    parser.add_argument("--rescore", action="store_true", help="recompute estimates from the stored measurements")
    parser.add_argument("--child", nargs=3, metavar=("POINT", "PATH", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(measure_point(json.loads(args.child[0]), args.child[1], int(args.child[2]))))
        return 0
    raw_file = args.out / RAW_FILE
    if not args.rescore:
        import peft
        import torch
        import transformers

        with tempfile.TemporaryDirectory() as work:
            names = args.points.split(",")
            unknown = [n for n in names if n not in GRID]
            if unknown:
                parser.error(f"unknown points {unknown}: choose from {', '.join(GRID)}")
            rows = run_grid(args.model, names, args.threads, Path(work))
            raw = {"model": args.model, "model_path": model_folder(args.model, Path(work)), "rows": rows,
                   "device": "cuda" if torch.cuda.is_available() else "cpu", "machine": platform.machine(),
                   "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                   "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
                   "command": "python benchmarks/memory.py" + (f" --model {args.model}" if args.model != "demo" else "")}
            args.out.mkdir(parents=True, exist_ok=True)
            raw_file.write_text(json.dumps(raw, indent=1) + "\n")
            config_copy = json.loads(Path(raw["model_path"], "config.json").read_text())
        raw["config"] = config_copy
        raw_file.write_text(json.dumps(raw, indent=1) + "\n")
    raw = json.loads(raw_file.read_text())
    rows = score(raw)
    write_results(raw, rows, args.out)
    for r in rows:
        print(f"{r['name']:>14}: estimate {r['estimate'] / 2**20:7.0f} MiB, measured {r['measured'] / 2**20:7.0f} MiB, "
              f"ratio {r['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
