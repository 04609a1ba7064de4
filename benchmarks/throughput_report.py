"""Throughput benchmark, part 3 of 3: summaries, acceptance checks and the written report (md, csv, png).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from benchmarks.throughput_arms import ACCEPTANCE, ARMS, LEARNING_RATE, LORA, PADDING_TOLERANCE


def summarize(runs: list[dict]) -> dict:
    """Per arm: mean and spread over seeds; kit vs recipe ratios and held-out differences per seed."""
    out = {}
    for arm in ARMS:
        speeds = [r["arms"][arm]["real_tokens_per_s"] for r in runs]
        steps = [r["arms"][arm]["seconds_per_step"] for r in runs]
        held = [r["arms"][arm]["heldout_loss"] for r in runs]
        out[arm] = {"real_tokens_per_s": statistics.mean(speeds), "real_tokens_per_s_min": min(speeds),
                    "real_tokens_per_s_max": max(speeds), "seconds_per_step": statistics.mean(steps),
                    "heldout_loss": statistics.mean(held), "heldout_loss_min": min(held), "heldout_loss_max": max(held),
                    "heldout_loss_sd": statistics.stdev(held) if len(held) > 1 else 0.0,
                    "padding_efficiency": statistics.mean(r["arms"][arm]["padding_efficiency"] for r in runs)}
    ratios = [r["arms"]["kit"]["real_tokens_per_s"] / r["arms"]["recipe"]["real_tokens_per_s"] for r in runs]
    rel = [(r["arms"]["kit"]["heldout_loss"] - r["arms"]["recipe"]["heldout_loss"]) / r["arms"]["recipe"]["heldout_loss"]
           for r in runs]
    out["ratio_per_seed"] = ratios
    out["ratio"] = out["kit"]["real_tokens_per_s"] / out["recipe"]["real_tokens_per_s"]
    out["heldout_rel_per_seed"] = rel
    out["heldout_rel_mean"] = (out["kit"]["heldout_loss"] - out["recipe"]["heldout_loss"]) / out["recipe"]["heldout_loss"]
    out["heldout_kit_above"] = sum(x > 0 for x in rel)
    out["heldout_without_end_rel_per_seed"] = [
        (r["arms"]["kit"]["heldout_loss_without_end"] - r["arms"]["recipe"]["heldout_loss_without_end"])
        / r["arms"]["recipe"]["heldout_loss_without_end"] for r in runs]
    positions = {arm: sum(r["arms"][arm]["padded_tokens"] for r in runs) / sum(r["arms"][arm]["seconds"] for r in runs)
                 for arm in ARMS}
    out["position_ratio"] = positions["kit"] / positions["recipe"]  # per position computed, padding included
    return out


def acceptance(report: dict) -> dict:
    """The issue's acceptance checks on the mixed set and the memory rows (None = not measured)."""
    mixed = report["data_sets"].get("mixed", {}).get("summary")
    memory = {row["arm"]: row for row in report["memory"]}
    result = {}
    if mixed:
        result["seeds_run"] = len(report["data_sets"]["mixed"]["runs"])
        result["speedup"] = (mixed["ratio"], mixed["ratio"] >= ACCEPTANCE["speedup"])
        result["heldout_within"] = (mixed["heldout_rel_mean"], abs(mixed["heldout_rel_mean"]) <= ACCEPTANCE["heldout_rel"])
        result["heldout_above"] = (mixed["heldout_kit_above"], mixed["heldout_kit_above"] <= ACCEPTANCE["heldout_above_max"])
    if set(memory) == set(ARMS):
        ratio = memory["kit"]["peak_rss_mb"] / memory["recipe"]["peak_rss_mb"]
        above = ((memory["kit"]["peak_rss_mb"] - memory["kit"]["model_rss_mb"])
                 / (memory["recipe"]["peak_rss_mb"] - memory["recipe"]["model_rss_mb"]))
        result["memory"] = (ratio, ratio <= ACCEPTANCE["memory_ratio"])
        result["memory_above_model"] = (above, above <= ACCEPTANCE["memory_ratio"])
    return result


CSV_FIELDS = ["data_set", "seed", "arm", "steps", "real_tokens", "padded_tokens", "padding_efficiency", "seconds_per_step",
              "real_tokens_per_s", "heldout_loss", "heldout_loss_without_end"]


def write_report(report: dict, out: Path) -> None:
    """report.json, results.csv, throughput.png and report.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for name, ds in report["data_sets"].items():
            for run in ds["runs"]:
                for arm in run["arms"].values():
                    w.writerow({"data_set": name, "seed": run["seed"],
                                **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in arm.items() if k in CSV_FIELDS}})
    _plot(report, out / "throughput.png")
    (out / "report.md").write_text(render_markdown(report))


def _plot(report: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [n for n, ds in report["data_sets"].items() if ds.get("summary")]
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(5 * max(1, len(sets)), 3.8), squeeze=False)
    for ax, name in zip(axes[0], sets):
        s = report["data_sets"][name]["summary"]
        speeds = [s[a]["real_tokens_per_s"] for a in ARMS]
        low = [s[a]["real_tokens_per_s"] - s[a]["real_tokens_per_s_min"] for a in ARMS]
        high = [s[a]["real_tokens_per_s_max"] - s[a]["real_tokens_per_s"] for a in ARMS]
        bars = ax.bar(ARMS, speeds, yerr=[low, high], color=["#999999", "#2a7ab9"], capsize=4)
        for bar, arm in zip(bars, ARMS):
            ax.annotate(f"{s[arm]['padding_efficiency']:.0%} real", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("real (non-padding) tokens / s")
        ax.set_title(f"{name}: kit {s['ratio']:.2f}x the recipe")
    fig.suptitle(f"{report['model']}: LoRA training throughput, batch {report['batch_size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def _verdict(item) -> str:
    return "met" if item[1] else "NOT met"


def render_markdown(r: dict) -> str:
    th = r["threads"]
    lines = [
        "# Training speed, memory and loss: the kit vs the LoRA recipe people copy",
        "",
        f"Model `{r['model']}` ({r['device']}), LoRA r{LORA['r']} all-linear, fp32, AdamW lr {LEARNING_RATE:g} with linear "
        f"decay, batch {r['batch_size']}, {r['steps']} optimizer steps per arm and run (every chat seen once). "
        f"Threads: torch {th['torch_threads']} intra-op / {th['torch_interop_threads']} inter-op on {th['cores']} cores, "
        f"OMP_NUM_THREADS={th['OMP_NUM_THREADS']}, MKL_NUM_THREADS={th['MKL_NUM_THREADS']}, "
        f"OMP_WAIT_POLICY={th['OMP_WAIT_POLICY']}. Load average at the end "
        f"{', '.join(f'{x:.1f}' for x in r['load_average'])} (a shared machine). Wall time {r['wall_seconds']:.0f} s.",
        "",
        "Arms: **recipe** = alpaca-lora's recipe: `Trainer` + `DataCollatorForSeq2Seq` with labels = input ids "
        "(padding labelled -100), random batches padded to their longest, the model's own loss; **kit** = `lora_nb.train`'s path: padding-free rows (one row per batch, `position_ids` "
        "restarting per example, attention per example), the loss through the output head in chunks, every label "
        "token of a step weighing the same. Both arms of a run share the chats, the initial adapter and the batch "
        "order, and take optimizer steps in turn so that both see the same machine load.",
    ]
    acc = r.get("acceptance", {})
    if acc:
        lines += ["", "## Acceptance (CPU)", ""]
        if "speedup" in acc:
            lines.append(f"- Real tokens/s on 20-400 tokens: kit {acc['speedup'][0]:.2f}x the recipe (needed "
                         f">= {ACCEPTANCE['speedup']}x): {_verdict(acc['speedup'])}.")
            lines.append(f"- Held-out loss, mean of the seeds: kit {acc['heldout_within'][0]:+.2%} vs the recipe "
                         f"(needed within {ACCEPTANCE['heldout_rel']:.0%}): {_verdict(acc['heldout_within'])}; kit above the "
                         f"recipe in {acc['heldout_above'][0]} of {acc['seeds_run']} seed(s) run (allowed "
                         f"{ACCEPTANCE['heldout_above_max']} of {ACCEPTANCE['seeds']}): {_verdict(acc['heldout_above'])}.")
            if acc["seeds_run"] < ACCEPTANCE["seeds"]:
                lines.append(f"- **Partial:** {acc['seeds_run']} of the {ACCEPTANCE['seeds']} seeds the acceptance "
                             "asks for have run; the checks above cover only those.")
            if r["steps"] < ACCEPTANCE["steps"]:
                lines.append(f"- **Short runs:** {r['steps']} optimizer steps per arm, not the {ACCEPTANCE['steps']} the "
                             "acceptance asks for: fewer batches, so the real share of positions (and the ratio) "
                             "varies more with the draw.")
        if "memory" in acc:
            lines.append(f"- Peak memory (whole process, batch {r['batch_size']}, {r['memory_max_length']}-token cut): kit "
                         f"{acc['memory'][0]:.2f}x the recipe (needed <= {ACCEPTANCE['memory_ratio']}x): "
                         f"{_verdict(acc['memory'])}; memory above the loaded model: {acc['memory_above_model'][0]:.2f}x.")
    for name, ds in r["data_sets"].items():
        s = ds.get("summary")
        if not s:
            continue
        first = ds["runs"][0]
        lines += [
            "", f"## {name}: {ds['description']}", "",
            f"{len(ds['runs'])} seed(s) ({', '.join(str(x['seed']) for x in ds['runs'])}); lengths of the first seed's "
            f"chats {first['lengths']['min']}-{first['lengths']['max']} tokens (mean {first['lengths']['mean']:.0f}, "
            f"{first['lengths']['over_1000']} over 1,000), cut at {ds['max_length']}, batch {ds['batch_size']}. Kit plan: padding-free "
            f"{first['plan']['padding_free']}, chunked loss {first['plan']['chunked_loss']}.",
            "",
            "| arm | real tokens / s (mean, min-max) | s / step | real share of positions | held-out loss (mean, min-max, sd) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for arm in ARMS:
            a = s[arm]
            lines.append(f"| {arm} | {a['real_tokens_per_s']:.1f} ({a['real_tokens_per_s_min']:.1f}-{a['real_tokens_per_s_max']:.1f}) | "
                         f"{a['seconds_per_step']:.2f} | {a['padding_efficiency']:.0%} | {a['heldout_loss']:.4f} "
                         f"({a['heldout_loss_min']:.4f}-{a['heldout_loss_max']:.4f}, {a['heldout_loss_sd']:.4f}) |")
        lines += ["", "| seed | kit / recipe real tokens/s | held-out recipe | held-out kit | kit vs recipe | "
                      "kit vs recipe without end-of-turn | packed = alone (max rel diff) | padded = alone | same start |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run, ratio, rel, rel_text in zip(ds["runs"], s["ratio_per_seed"], s["heldout_rel_per_seed"],
                                             s["heldout_without_end_rel_per_seed"]):
            lines.append(f"| {run['seed']} | {ratio:.2f}x | {run['arms']['recipe']['heldout_loss']:.4f} | "
                         f"{run['arms']['kit']['heldout_loss']:.4f} | {rel:+.2%} | {rel_text:+.2%} | "
                         f"{run['checks']['packed_rel']:.1e} | {run['checks']['padded_rel']:.1e} | {run['identical_start']} |")
        share = s["recipe"]["padding_efficiency"]
        lines += ["", f"**Kit / recipe real-token throughput on {name}: {s['ratio']:.2f}x** (held-out loss before "
                      f"training {first['heldout_before']:.3f}). It splits into the padding the kit drops (the recipe's "
                      f"real share {share:.0%}: at most {1 / share:.2f}x at equal cost per position) and the cost per "
                      f"position: the kit computes {s['position_ratio']:.2f}x the recipe's positions per second."]
    if r["memory"]:
        lines += ["", "## Peak memory", "",
                  f"Each arm in a fresh process: {r['memory'][0]['steps']} training steps of batch "
                  f"{r['memory'][0]['batch_size']} over the longest chats of a long-tail set cut at "
                  f"{r['memory'][0]['max_length']} tokens (every example cut to that length). Peak RSS of the whole process (VmHWM).",
                  "", "| arm | peak RSS MiB | RSS with the model loaded MiB | peak above the loaded model MiB |",
                  "| --- | --- | --- | --- |"]
        for m in r["memory"]:
            lines.append(f"| {m['arm']} | {m['peak_rss_mb']:.0f} | {m['model_rss_mb']:.0f} | "
                         f"{m['peak_rss_mb'] - m['model_rss_mb']:.0f} |")
    lines += [
        "", "## Notes", "",
        "- Held-out loss: mean token loss of held-out chats of the same length range, computed alone (unpadded), on "
        "every token (both arms learn every token). The pad=eos trap: with `DataCollatorForLanguageModeling` (the "
        "other recipe people copy) every pad-id token is labelled -100, and SmolLM2's pad token is its end-of-turn "
        "token, so that recipe never learns to end a turn, and a held-out loss on the tokens it learns leaves "
        "out what the kit spends part of each update on. The column 'without end-of-turn' gives that measure.",
        "- `packed = alone` and `padded = alone`: per-example loss of the held-out chats in one padding-free row (the "
        f"kit's attention) or one padded batch vs alone, before training; tolerance {PADDING_TOLERANCE:g}.",
        "- Timings come from a shared CPU: the arms alternate step by step so that each sees the same load; compare "
        "ratios, not absolute speeds.",
        *[f"- {note}" for note in r.get("notes", [])],
        "", "![throughput](throughput.png)", "",
        f"Reproduce: `{r['command']}`", "",
    ]
    if r.get("parts"):
        lines[-2:-1] = ["Reproduce: these parts (each its own process and folder; they may run side by side):", "",
                        *[f"- `{part}`" for part in r["parts"]], "", f"then `{r['command']}`"]
    return "\n".join(lines)


def merge_reports(reports: list[dict], command: str = "", notes: list[str] | None = None) -> dict:
    """One report from several partial ones (e.g. one process per seed, run side by side).

    Runs are pooled per data set (ordered by seed), the memory rows taken from whichever report has
    them; summaries and acceptance are recomputed. All parts must share the model, batch, steps and
    thread settings: otherwise their ratios do not pool.
    """
    if not reports:
        raise ValueError("nothing to merge")
    with_runs = [r for r in reports if any(ds["runs"] for ds in r["data_sets"].values())] or reports
    first = with_runs[0]
    for r in reports:  # a memory-only part need not share steps or held-out size
        keys = ("model", "batch_size", "steps", "threads", "heldout") if r in with_runs else ("model", "batch_size")
        for key in keys:
            if r[key] != first[key]:
                raise ValueError(f"the reports differ in {key}: {first[key]!r} vs {r[key]!r}")
    merged = {**first, "data_sets": {}, "memory": [], "parts": [r["command"] for r in reports]}
    for r in reports:
        for name, ds in r["data_sets"].items():
            into = merged["data_sets"].setdefault(name, {**ds, "runs": [], "seeds": []})
            into["runs"] += ds["runs"]
        merged["memory"] = merged["memory"] or r["memory"]
    for ds in merged["data_sets"].values():
        ds["runs"].sort(key=lambda run: run["seed"])
        ds["seeds"] = [run["seed"] for run in ds["runs"]]
        if ds["runs"]:
            ds["summary"] = summarize(ds["runs"])
        else:
            ds.pop("summary", None)
    merged["seeds"] = merged["data_sets"].get("mixed", {}).get("seeds", [])
    merged["wall_seconds"] = max(r["wall_seconds"] for r in reports)
    merged["load_average"] = max((r["load_average"] for r in reports), key=lambda x: x[0])
    merged["command"] = command or " && ".join(merged["parts"])
    merged["notes"] = list(notes or [])  # what the parts cannot say themselves (e.g. a part measured on older code)
    merged["acceptance"] = acceptance(merged)
    return merged
