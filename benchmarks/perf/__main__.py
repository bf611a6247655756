"""``make perf`` / ``python -m benchmarks.perf``: performance figures (not timed tests).

Parts:
  ops    (a) peak memory of the reference attention_rows (1 query row, 32 heads, N up to 2,880 keys)
         against the full attention map; (b) per-op timings: reference on CPU, and on CUDA Triton vs
         reference (a clear "skipped: no CUDA GPU" line otherwise).
  model  pruner overhead as a fraction of the unpruned prefill and realised prefill speed-up against
         the FLOPs bound on a LLaVA-1.5-shaped model (real hidden sizes, a few layers, random weights;
         --model llava-next: LLaVA-NeXT-shaped, anyres; --model qwen2.5-vl-7b-shape: Qwen2.5-VL-7B-shaped
         (qwen3-vl-8b-shape: Qwen3-VL-8B-shaped, DeepStack),
         a 448 x 448 image by default; or a conf/model name such as tiny-next or tiny-qwen2-vl);
         ``--methods all``: every registered method (those that refuse the model are listed with the
         reason); see ``benchmarks/perf/model.py``.
  scoring (d) one Llama-7B-shaped decoder layer three ways (SDPA; SDPA + prunebench's scoring step; the
         peer way, eager with full attention maps) at N = 576, 1,440, 2,880 visual tokens; (e) the
         scoring step users run against the attention_rows op (memory, time); (f) the vision side: a
         CLIP-L/14-336 layer's CLS row three ways; see ``benchmarks/perf/scoring.py``.
  batch  (g) samples per second of the embedded model's generate() at batch 1 / 4 / 16 (the runner's
         own loop); see ``benchmarks/perf/batch.py``.

Figures are printed as markdown tables and written to ``results/perf/perf.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.perf.table import print_table

PARTS = ("ops", "model", "scoring", "batch")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of: {', '.join(PARTS)} (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable on shared machines)")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per op timing (torch.utils.benchmark)")
    p.add_argument("--text-layers", type=int, default=4,
                   help="model part: LLM decoder layers (hidden 4096; 4: the fewest every in-LLM method accepts)")
    p.add_argument("--vision-layers", type=int, default=3,
                   help="model part: CLIP-L/14-336 layers (3: FlowCut prunes before the feature layer, the second last)")
    p.add_argument("--repeats", type=int, default=3, help="model part: timed prefills per configuration")
    p.add_argument("--methods", default="all",
                   help="model part: pruners to time (comma list, or 'all' (default): every registered method)")
    p.add_argument("--scoring-sizes", default="576,1440,2880",
                   help="scoring part: visual tokens N of the decoder-layer comparison")
    p.add_argument("--batch-sizes", default="1,4,16", help="batch part: batch sizes")
    p.add_argument("--batch-samples", type=int, default=64, help="batch part: samples per timed pass")
    p.add_argument("--budgets", default=None,
                   help="model part: visual tokens kept per image (default 1/3, 2/9, 1/9 of the image's tokens: "
                        "192,128,64 of LLaVA-1.5's 576); checked as the runner checks budgets")
    p.add_argument("--model", default="llava-1.5",
                   help="model part: llava-1.5 (default) or llava-next (7B-shaped, few layers), or a conf/model "
                        "name (e.g. tiny-next)")
    p.add_argument("--image-size", default=None,
                   help="model part, anyres models: image HxW in px (default: the largest pinpoint, the longest run)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu (default) or cuda: Triton vs reference per op and the model prefill timed with CUDA "
                        "events; without a CUDA GPU a clear skip line")
    p.add_argument("--out", default="results/perf/perf.json", help="where to write the figures as JSON")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts accepts {', '.join(PARTS)}; got {unknown}")
    torch.set_num_threads(args.threads)
    from benchmarks.perf import git_commit

    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": git_commit(),
        "torch": torch.__version__, "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "threads": args.threads, "device": args.device, "dtype": "float32 (model part; ops: per row)",
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    out = Path(args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        report["skipped"] = "no CUDA GPU (torch.cuda.is_available() is False): nothing was timed"
        print(f"skipped: --device cuda: {report['skipped']}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {out}")
        return report

    if "ops" in parts:
        from benchmarks.perf.ops import attention_memory, op_timings

        print("## (a) attention_rows reference: peak extra tensor memory, 1 query row, 32 heads, head_dim 128\n")
        mem = attention_memory()
        print_table(mem, ["what", "dtype", "n_keys", "peak_mb", "peak_over_HxN_fp32", "full_map_fp32_mb",
                          "full_map_over_peak"])
        print("peak_over_HxN_fp32 = peak / (heads * n_keys * 4 bytes): constant in N means O(H x N).\n")
        report["attention_memory"] = mem

        print("## (b) per-op timings\n")
        rows, skip = op_timings(args.min_run_time)
        print_table(rows)
        if skip:
            print(skip + "\n")
        report["op_timings"] = rows
        report["op_timings_triton"] = skip or "measured"

    if "model" in parts:
        from benchmarks.perf.model import model_perf

        budgets = [int(b) for b in args.budgets.split(",") if b.strip()] if args.budgets else None
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if methods == ["all"]:
            from pruners import available_pruners

            methods = [m for m in available_pruners() if m != "none"]
        size = tuple(int(v) for v in args.image_size.lower().split("x")) if args.image_size else None
        if size is not None and len(size) != 2:
            raise SystemExit(f"--image-size takes HxW (e.g. 672x672), got {args.image_size!r}")
        report["model"] = model_perf(
            text_layers=args.text_layers, vision_layers=args.vision_layers, methods=methods, budgets=budgets,
            repeats=args.repeats, model=args.model, image_size=size, device=args.device,
        )

    if "scoring" in parts:
        from benchmarks.perf.scoring import scoring_perf, vision_scoring_perf

        sizes = tuple(int(v) for v in args.scoring_sizes.split(",") if v.strip())
        report["scoring"] = scoring_perf(sizes=sizes, repeats=args.repeats)
        report["vision_scoring"] = vision_scoring_perf(repeats=args.repeats)

    if "batch" in parts:
        from benchmarks.perf.batch import batch_perf

        sizes = tuple(int(v) for v in args.batch_sizes.split(",") if v.strip())
        # last: the allocator setting is process-wide (the runner sets it too, `benchmarks.allocator`)
        res = batch_perf(batch_sizes=sizes, n_samples=args.batch_samples, repeats=args.repeats, malloc_tuned=True)
        res.pop("predictions")  # checked in the rows (same_predictions_as_smallest)
        report["batch"] = res

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
