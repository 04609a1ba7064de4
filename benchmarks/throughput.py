"""Benchmark: training speed, memory and held-out loss of the kit against the LoRA recipe people copy.

Same model, same synthetic chats, same initial adapter, same optimizer steps, two arms:

- `recipe`: the plain recipe (reference/llama2-qlora-walkthrough.md, alpaca-lora): `get_peft_model` +
  `Trainer` + `DataCollatorForSeq2Seq` over chats tokenized with truncation, labels = input ids, random
  order, each batch padded to its longest example (dynamic padding), the model's own loss;
- `kit`: what `lora_nb.train.train` builds: `KitSettings.to_peft` / `to_training_args`,
  `data.tokenize_examples`, and `batching.plan_batches` + `KitTrainer`: padding-free rows with
  per-example attention, the loss through the output head in chunks, every label token of a step
  weighing the same.

Per data set (`mixed`: 20-400 tokens; `long_tail`: the same plus a few chats of 1,000+ tokens) and
per seed (the seed draws the chats, the adapter's initial weights and the batch order; both arms
share all three), the two arms train in threads that take turns step by step, so that both see the
same machine load. Reported per arm: real (non-padding) tokens/s, seconds per step, held-out loss
(mean token loss of held-out chats on every token; also without end-of-turn tokens), and their spread over seeds.
Peak memory is measured per arm in a fresh process (batch 8, the longest batches of the data set,
512-token cut), as the process's peak RSS. The torch/OpenMP thread settings are reported.

    python benchmarks/throughput.py                      # demo model, the committed run
    python benchmarks/throughput.py --model tiny --steps 3 --seeds 0 --no-long-tail --memory-steps 0
"""

from __future__ import annotations
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on a shared CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from benchmarks.models import model_folder  # noqa: E402
from benchmarks.throughput_arms import (  # noqa: E402
    ARMS, LONG_MAX_LENGTH, MAX_LENGTH, PADDING_TOLERANCE, RESULTS_DIR, _tokenizer, make_data_set)
from benchmarks.throughput_measure import (  # noqa: E402
    TurnTaker, _one_malloc_arena, measure_memory, memory_child, run_once, thread_settings)
from benchmarks.throughput_report import acceptance, merge_reports, render_markdown, summarize, write_report  # noqa: E402

__all__ = ["PADDING_TOLERANCE", "TurnTaker", "main", "make_data_set", "run_benchmark"]  # what tests and callers use

def run_benchmark(model: str = "demo", steps: int = 20, seeds: tuple[int, ...] = (0, 1, 2), batch_size: int = 8,
                  min_len: int = 20, max_len: int = 400, heldout: int = 8, threads: int | None = None,
                  long_tail: bool = True, long_tail_seeds: int = 1, n_long: int = 4, long_tail_batch_size: int = 2,
                  memory_steps: int = 2, mixed: bool = True,
                  max_length: int = MAX_LENGTH, out_dir: Path | None = RESULTS_DIR, workdir: Path | None = None,
                  command: str = "") -> dict:
    """Run the whole benchmark and return the report as a dict (written to `out_dir` after every run).

    Args:
        model: `demo`, `tiny` or a model folder.
        steps: optimizer steps per arm and run (the data set is `steps * batch_size` chats, so every
            chat is seen once).
        seeds: one run per seed on the mixed set.
        batch_size: chats per step.
        min_len, max_len: range of the mixed chats' lengths, in tokens.
        heldout: held-out chats per run.
        threads: torch CPU threads (default: torch's choice).
        long_tail: also run the long-tail set (the mixed lengths plus `n_long` chats of 1,000-1,400
            tokens, cut at `LONG_MAX_LENGTH`), with the first `long_tail_seeds` seeds, at batch
            `long_tail_batch_size` (the recipe pads a batch to its longest chat: 8 x 1,400 positions
            would take about 35 GB on the demo model on CPU).
        memory_steps: steps of the peak-memory measurement per arm (0 = skip).
        mixed: run the mixed set (False: only the long-tail set and memory, e.g. as one part of a
            benchmark run side by side and merged with `--merge`).
        max_length: truncation length of the mixed set and the memory measurement.
        out_dir: where report.md, report.json, results.csv and throughput.png go (None = nowhere).
        workdir: scratch folder (default: a temporary one).
        command: the command line, quoted in the report.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if threads:
        torch.set_num_threads(threads)
    _one_malloc_arena()
    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    work = Path(workdir or tmp.name)
    path = model_folder(model, work)
    tokenizer = _tokenizer(path)
    data_sets = {"mixed": {"description": f"chats of {min_len}-{max_len} tokens", "min_len": min_len,
                           "max_len": max_len, "n_long": 0, "max_length": max_length, "seeds": list(seeds),
                           "batch_size": batch_size}}
    if long_tail:
        data_sets["long_tail"] = {"description": f"chats of {min_len}-{max_len} tokens and {n_long} of 1,000-1,400",
                                  "min_len": min_len, "max_len": max_len, "n_long": n_long,
                                  "max_length": LONG_MAX_LENGTH, "seeds": list(seeds)[:long_tail_seeds],
                                  "batch_size": long_tail_batch_size}
    report = {"model": model, "model_path": path, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "threads": thread_settings(), "batch_size": batch_size, "steps": steps, "seeds": list(seeds),
              "heldout": heldout, "memory_max_length": max_length, "command": command or "python benchmarks/throughput.py",
              "data_sets": {name: {**ds, "runs": []} for name, ds in data_sets.items()}, "memory": [],
              "python": platform.python_version(), "torch": torch.__version__}

    def save():
        report["load_average"] = os.getloadavg()
        report["wall_seconds"] = time.perf_counter() - started
        report["acceptance"] = acceptance(report)
        if out_dir is not None:
            write_report(report, Path(out_dir))

    def run_set(name):
        ds = report["data_sets"][name]
        for seed in ds["seeds"]:
            print(f"{name}, seed {seed}:", flush=True)
            ds["runs"].append(run_once(path, tokenizer, {**ds, "name": name}, seed, steps, ds["batch_size"], heldout,
                                       work))
            ds["summary"] = summarize(ds["runs"])
            save()

    if memory_steps:  # the acceptance measurements first (the shortest first): results are saved after each
        report["memory"] = measure_memory(path, memory_steps, batch_size, max_length)
        save()
    if mixed:
        run_set("mixed")
    if long_tail:
        run_set("long_tail")
    if tmp is not None:
        tmp.cleanup()
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="demo, tiny, or a model folder")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per arm and run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the mixed set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--heldout", type=int, default=8)
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help="truncation length (mixed set, memory)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-long-tail", action="store_true", help="skip the long-tail set")
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed set (e.g. to run the long-tail set alone)")
    p.add_argument("--long-tail-seeds", type=int, default=1, help="how many of the seeds also run the long-tail set")
    p.add_argument("--long-tail-batch-size", type=int, default=2, help="batch size of the long-tail set")
    p.add_argument("--memory-steps", type=int, default=2, help="steps of the peak-memory run per arm (0 = skip)")
    p.add_argument("--memory-child", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="only merge the report.json of these folders (parts run side by side) into --out")
    p.add_argument("--note", action="append", default=[], help="with --merge: a note for the merged report (repeatable)")
    a = p.parse_args(argv)
    if a.merge:
        report = merge_reports([json.loads((Path(d) / "report.json").read_text()) for d in a.merge],
                               command="python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                               notes=a.note)
        write_report(report, Path(a.out))
        print(render_markdown(report))
        return report
    if a.memory_child:
        if a.threads:
            torch.set_num_threads(a.threads)
        row = memory_child(a.memory_child, model_folder(a.model, Path(tempfile.mkdtemp())), a.memory_steps,
                           a.batch_size, a.max_length)
        print(json.dumps(row))
        return row
    report = run_benchmark(a.model, a.steps, tuple(int(s) for s in a.seeds.split(",") if s), a.batch_size, a.min_len,
                           a.max_len, a.heldout, a.threads, not a.no_long_tail, a.long_tail_seeds,
                           long_tail_batch_size=a.long_tail_batch_size, memory_steps=a.memory_steps, mixed=not a.no_mixed, max_length=a.max_length, out_dir=Path(a.out),
                           command="python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    main()
