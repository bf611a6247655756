"""The README's performance figures, rendered from one ``make perf`` run's ``perf.json``.

``python -m benchmarks.perf.report results/perf/perf.json --write README.md`` replaces the block
between ``<!-- perf:begin -->`` and ``<!-- perf:end -->`` in the README with tables rendered from that
one run, and copies the run to ``docs/perf/perf.json`` (``--keep``), so the README's figures can be
traced to, and checked against, the measurement they come from (``tests/test_perf_report.py``).
Nothing here measures: it only formats.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.perf.table import markdown_table

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
KEPT = Path(__file__).resolve().parents[2] / "docs" / "perf" / "perf.json"


def _pct(v: float | None) -> str:
    if v is None:
        return ""
    return "<0.01%" if v < 1e-4 else f"{100 * v:.2f}%"


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _header(r: dict[str, Any]) -> str:
    commit = (r.get("commit") or "unknown")[:12]
    return (f"Measured in one run of `make perf` ({r['when']}, commit `{commit}`, torch {r['torch']}, "
            f"{r.get('device', 'cpu')}, {r['threads']} torch thread(s), {r['machine']}). Unless a column says "
            "wall, times and ratios are **process CPU time** (robust to other jobs on the cores; one thread, so "
            "they track wall time on an idle machine). Peaks are the exact live-tensor bytes each call "
            "allocates (`benchmarks/perf/memory.py`).\n")


def _ops(r: dict[str, Any]) -> str:
    rows = [m for m in r.get("attention_memory", []) if m["what"].startswith("reference")]
    if not rows:
        return ""
    out = ["**(a) The `attention_rows` op alone**: one query row against N keys, 32 heads, head_dim 128.\n",
           markdown_table(rows, ["dtype", "n_keys", "peak_mb", "peak_over_HxN_fp32", "full_map_fp32_mb"],
                          {"n_keys": "N keys", "peak_mb": "peak (MB)", "peak_over_HxN_fp32": "peak / (H x N x 4 B)",
                           "full_map_fp32_mb": "one fp32 map [32, N, N] (MB)"})]
    naive = [m for m in r["attention_memory"] if not m["what"].startswith("reference")]
    for m in naive:
        out.append(f"A naive eager map then one row at N = {m['n_keys']} peaks at {m['peak_mb']:.0f} MB.\n")
    return "\n".join(out)


def _scoring(r: dict[str, Any]) -> str:
    s = r.get("scoring")
    if not s:
        return ""
    three = [{**row, "scored": _x(row["scored_over_sdpa"]), "eager": _x(row["eager_maps_over_sdpa"]),
              "peaks": f"{row['sdpa_peak_mb']:.0f} / {row['scored_peak_mb']:.0f} / {row['eager_maps_peak_mb']:.0f}",
              "ratio": _x(row["peak_ratio_eager_over_scored"])} for row in s["three_way"]]
    mem = [{**m, "cached_of_layer": _pct(m["cached_of_layer"]), "uncached_of_layer": _pct(m["uncached_of_layer"])}
           for m in s["scoring_memory"]]
    big = max(s["scoring_memory"], key=lambda m: m["N"])  # the goals are set at the longest run (2,880)
    # "one extra key tensor": 1.01 leaves room for the query row and one RoPE chunk (about 0.1% at 2,880)
    ok = big["cached_over_op"] <= 4 and big["uncached_extra_keys"] <= 1.01 and big["cached_of_layer"] <= 1e-3
    return "\n".join([
        f"**(d) One decoder layer three ways** ({s['layer']}; prompt 35 + N + 20 tokens; median of "
        f"{s['repeats']}): SDPA unpruned (the floor), SDPA plus prunebench's scoring step (FastV's row, the "
        "engine's own `LLMStage._rows_from` reading the KV cache the layer wrote), and the peer way (eager "
        "attention with `output_attentions=True`, the full [H, L, L] map most released code scores from).\n",
        markdown_table(three, ["N", "sdpa_cpu_ms", "scored", "eager", "peaks", "ratio", "max_abs_diff_vs_map_row"],
                       {"sdpa_cpu_ms": "SDPA layer (CPU ms)", "scored": "SDPA + our scoring",
                        "eager": "eager + maps", "peaks": "peak MB: SDPA / ours / eager",
                        "ratio": "eager peak / ours", "max_abs_diff_vs_map_row": "max abs diff vs map row"}),
        "**(e) The scoring step users run**, against the `attention_rows` op on the same q/k. Goals: with "
        "the KV cache at most 4x the op's peak and at most 0.1% of the layer; without a cache at most one "
        f"extra [H, L, d] key tensor, at N = {big['N']:,}: {'all met in this run' if ok else 'not all met in this run'}.\n",
        markdown_table(mem, ["N", "op_peak_mb", "cached_peak_mb", "cached_over_op", "cached_cpu_ms", "cached_of_layer",
                             "uncached_peak_mb", "uncached_extra_keys", "uncached_of_layer"],
                       {"op_peak_mb": "op peak (MB)", "cached_peak_mb": "cached peak (MB)",
                        "cached_over_op": "cached / op", "cached_cpu_ms": "cached (CPU ms)",
                        "cached_of_layer": "cached / layer", "uncached_peak_mb": "no cache: peak (MB)",
                        "uncached_extra_keys": "no cache: extra key tensors", "uncached_of_layer": "no cache / layer"}),
    ])


def _vision(r: dict[str, Any]) -> str:
    v = r.get("vision_scoring")
    if not v:
        return ""
    rows = [{**row, "ours": _x(row["cls_row_over_sdpa"]), "eager": _x(row["eager_maps_over_sdpa"]),
             "ratio": _x(row["peak_ratio_eager_over_cls_row"])} for row in v["rows"]]
    return "\n".join([
        f"**(f) The vision side** ({v['layer']}; median of {v['repeats']}): the CLS row that VTC-CLS, FasterVLM "
        "and VisionZip score with, through the engine (the layer's own q/k captured, `attention_rows` on the "
        "CLS query), against `output_attentions=True`.\n",
        markdown_table(rows, ["views", "sdpa_cpu_ms", "ours", "eager", "sdpa_peak_mb", "cls_row_peak_mb",
                              "eager_maps_peak_mb", "ratio", "max_abs_diff_vs_map_row"],
                       {"views": "images / tiles", "sdpa_cpu_ms": "SDPA (CPU ms)", "ours": "SDPA + CLS row",
                        "eager": "eager + maps", "sdpa_peak_mb": "SDPA peak (MB)", "cls_row_peak_mb": "ours peak (MB)",
                        "eager_maps_peak_mb": "eager peak (MB)", "ratio": "eager peak / ours",
                        "max_abs_diff_vs_map_row": "max abs diff vs map row"}),
    ])


def _model(r: dict[str, Any]) -> str:
    m = r.get("model")
    if not m:
        return ""
    rows = [{**row, "overhead_fraction": _pct(row["overhead_fraction"]),
             "projected_fraction_7b": _pct(row.get("projected_fraction_7b")),
             "speedup_cpu": _x(row["speedup_cpu"]), "flops_bound": _x(row["flops_bound"]),
             "of_bound_cpu": f"{row['of_bound_cpu']:.2f}"} for row in m["rows"]]
    worst = {}
    for row in m["rows"]:
        worst.setdefault(row["method"], []).append(row["of_bound_cpu"])
    random64 = [row for row in m["rows"] if row["method"] == "random"]
    notes = []
    if random64:
        low = min(random64, key=lambda row: row["budget"])
        notes.append(f"random at {low['budget']} tokens reaches {low['of_bound_cpu']:.2f} of the FLOPs bound "
                     "(goal 0.9).")
    for name, why in (m.get("refused") or {}).items():
        notes.append(f"`{name}` is not timed: it refuses this model ({why.split(':')[0]}).")
    params = {row["method"]: row.get("params") for row in m["rows"] if row.get("params")}
    for name, p in params.items():
        notes.append(f"`{name}` runs with {json.dumps(p)}.")
    return "\n".join([
        f"**(c) Pruner overhead and realised prefill speed-up**, every method and budget: {m['model']}; a "
        f"{m['prompt_tokens']}-token prompt with {m['visual_tokens']} image tokens; median of {m['repeats']}; "
        f"unpruned prefill {m['unpruned_prefill_cpu_ms'] / 1e3:.2f} s CPU. Speed-up = unpruned / pruned prefill "
        "time; FLOPs bound = unpruned / pruned prefill FLOPs (`benchmarks.flops`, the pruner's own FLOPs "
        "excluded); of bound = speed-up / bound. Overhead = CPU time inside the pruning code (scoring, "
        "selection, the adapter's bookkeeping); projected to the 7B's depth by the analytic FLOPs of 32 LLM "
        "+ 24 ViT layers. With few LLM layers an in-LLM method saves little: the bound is what matters.\n",
        markdown_table(rows, ["method", "budget", "overhead_cpu_ms", "overhead_fraction", "projected_fraction_7b",
                              "speedup_cpu", "flops_bound", "of_bound_cpu"],
                       {"overhead_cpu_ms": "overhead (CPU ms)", "overhead_fraction": "overhead / prefill",
                        "projected_fraction_7b": "projected to 7B depth", "speedup_cpu": "speed-up",
                        "flops_bound": "FLOPs bound", "of_bound_cpu": "of bound"}),
        " ".join(notes) + ("\n" if notes else ""),
    ])


def _batch(r: dict[str, Any]) -> str:
    b = r.get("batch")
    if not b:
        return ""
    rows = [{**row, "budget": row["budget"] if row["budget"] is not None else "null",
             "speedup": _x(row["cpu_speedup_vs_smallest"]), "pad": f"{100 * row['pad_fraction']:.1f}%",
             "same": "yes" if row["same_predictions_as_smallest"] else "NO"} for row in b["rows"]]
    return "\n".join([
        f"**(g) Batch throughput**: the runner's own loop (its input building, then `generate()`) on the "
        f"{b['model']} model, attention {b['attn_implementation']}, {b['n_samples']} shapes samples, median of "
        f"{b['repeats']}, glibc allocator tuned: {b['malloc_tuned']} (`benchmarks/allocator.py`: with glibc's "
        "defaults large batches page-fault their activations back in on every forward and batch 16 was slower "
        "per sample than batch 4).\n",
        markdown_table(rows, ["method", "budget", "batch_size", "samples_per_s", "samples_per_cpu_s", "speedup",
                              "inputs_ms", "generate_ms", "page_faults", "pad", "same"],
                       {"batch_size": "batch", "samples_per_s": "samples/s (wall)",
                        "samples_per_cpu_s": "samples per CPU s", "speedup": "vs batch 1 (CPU)",
                        "inputs_ms": "inputs (ms/sample)", "generate_ms": "generate (ms/sample)",
                        "page_faults": "page faults/sample", "pad": "padding",
                        "same": "same answers as batch 1"}),
    ])


def render(report: dict[str, Any]) -> str:
    """The README block (without the markers) for one perf run's figures."""
    parts = [_header(report), _model(report), _scoring(report), _vision(report), _batch(report), _ops(report)]
    return "\n".join(p for p in parts if p)


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between `BEGIN` and `END` replaced by ``block``; a ValueError without the markers."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {BEGIN} ... {END} block to replace")
    return text[: start + len(BEGIN)] + "\n\n" + block.rstrip() + "\n\n" + text[end:]


def current_block(text: str) -> str:
    """The README's block between the markers, as `render` produced it."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {BEGIN} ... {END} block")
    return text[start + len(BEGIN): end].strip()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("perf_json", help="a make perf run's results/perf/perf.json")
    p.add_argument("--write", metavar="README", help="replace the perf block of this file (else print it)")
    p.add_argument("--keep", action="store_true", help=f"also copy the run to {KEPT.relative_to(KEPT.parents[2])}")
    args = p.parse_args(argv)
    report = json.loads(Path(args.perf_json).read_text())
    block = render(report)
    if not args.write:
        print(block)
        return
    readme = Path(args.write)
    readme.write_text(replace_block(readme.read_text(), block))
    print(f"rewrote the perf block of {readme}")
    if args.keep and Path(args.perf_json).resolve() != KEPT:
        KEPT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.perf_json, KEPT)
        print(f"kept the run as {KEPT}")


if __name__ == "__main__":
    main()
