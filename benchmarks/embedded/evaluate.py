"""Evaluate the embedded model on the shapes eval split, unpruned and with direct pre-LLM selection.

``python -m benchmarks.embedded.evaluate [--model PATH] [--n 1000] [--out results.json]``

Pre-LLM pruning here is done by hand, exactly as its definition says: compute the image features once
(ViT hidden_states[-2] without CLS -> projector), keep a subset of the 144 patch features in raster
order, shrink the image placeholder run in input_ids / attention_mask to the kept count, and run the
LLM. Strategies (budgets as fractions of the 144 visual tokens):

- ``none``: all tokens;
- ``random``: a seeded uniform subset;
- ``oracle``: the sample's answer-relevant patches (priority order, see `Sample.relevant_patches`),
  truncated to the budget or padded with random other patches;
- ``cls``: top-k of the CLS row of ViT attention at layer -2 (the layer LLaVA reads), head mean.

Also times the standard Hugging Face path (processor + ``generate``) on the same samples, unpruned.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.embedded import model as M
from benchmarks.tasks import Sample, get_task

STRATEGIES = ("none", "random", "oracle", "cls")


def select(strategy: str, k: int, sample: Sample, cls_row: torch.Tensor, rng: np.random.Generator) -> list[int]:
    """Sorted (raster order) indices of the ``k`` patches kept by ``strategy`` for one sample.

    cls_row: [144] head-mean attention of CLS to the patches at ViT layer -2.
    """
    n = cls_row.shape[0]
    if strategy == "none" or k >= n:
        return list(range(n))
    if strategy == "random":
        keep = rng.choice(n, size=k, replace=False).tolist()
    elif strategy == "oracle":
        rel = sample.relevant_patches((M.GRID, M.GRID))[:k]
        others = [i for i in range(n) if i not in set(rel)]
        keep = rel + rng.choice(others, size=k - len(rel), replace=False).tolist()
    elif strategy == "cls":
        keep = torch.topk(cls_row, k).indices.tolist()
    else:
        raise ValueError(f"parameter 'strategy' must be one of {list(STRATEGIES)}, got {strategy!r}")
    return sorted(int(i) for i in keep)


@torch.no_grad()
def image_features(model, images) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, 144, D_llm] projected patch features, [B, 144] CLS attention row at ViT layer -2).

    Needs the vision tower loaded with eager attention (attention weights)."""
    out = M.vision_hidden(model.model.vision_tower, M.pixel_values(images), output_attentions=True)
    layer = model.config.vision_feature_layer
    feats = model.model.multi_modal_projector(out.hidden_states[layer][:, 1:])  # [B, 144, D]
    # attentions[i] is the attention inside the layer producing hidden_states[i + 1]; hidden_states[-2]
    # is produced by attentions[-2].
    cls_row = out.attentions[layer][:, :, 0, 1:].mean(1)  # [B, heads, 145, 145] -> [B, 144]
    return feats, cls_row


@torch.no_grad()
def evaluate(
    model,
    samples: list[Sample],
    strategies: list[tuple[str, int | None]],
    batch: int = 50,
    seed: int = 0,
) -> dict:
    """Accuracy (overall and per family) and mean relevant_recall for each (strategy, k) in
    ``strategies`` (k None = all tokens)."""
    from benchmarks.embedded.train import Encoder, pad_batch

    task = get_task("shapes")
    enc = Encoder()
    model.eval()
    scores: dict[str, dict[str, list[float]]] = {}
    recall: dict[str, list[float]] = {}
    for b in range(0, len(samples), batch):
        chunk = samples[b: b + batch]
        feats, cls_rows = image_features(model, [s.image for s in chunk])
        for strategy, k in strategies:
            name = strategy if k is None else f"{strategy}@{k}"
            kk = M.NUM_PATCHES if k is None else k
            keeps = []
            for i, s in enumerate(chunk):
                rng = np.random.default_rng([seed, b + i, kk, STRATEGIES.index(strategy)])
                keeps.append(select(strategy, kk, s, cls_rows[i], rng))
                rel = set(s.relevant_patches((M.GRID, M.GRID)))
                recall.setdefault(name, []).append(len(rel & set(keeps[-1])) / max(1, len(rel)))
            idx = torch.tensor(keeps)  # [B, k]
            kept = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))  # [B, k, D]
            ids, am = pad_batch([enc.prompt(s.question, n_image=kk) for s in chunk], enc.pad, left=True)
            pred = M.llm_logits(model, kept, ids, am)[:, -1].argmax(-1)
            for s, p in zip(chunk, pred.tolist()):
                word = enc.tok.convert_ids_to_tokens(p)
                scores.setdefault(name, {}).setdefault(s.family, []).append(task.score(word, s))
    res = {}
    for name, fam in scores.items():
        allv = [x for v in fam.values() for x in v]
        res[name] = {
            "overall": float(np.mean(allv)),
            "per_family": {f: float(np.mean(v)) for f, v in sorted(fam.items())},
            "relevant_recall": float(np.mean(recall[name])),
            "n": len(allv),
        }
    return res


@torch.no_grad()
def time_hf_generate(path: str | os.PathLike, samples: list[Sample], batch: int = 50, threads: int = 2) -> dict:
    """Wall time of the standard path (AutoProcessor + LlavaForConditionalGeneration.generate, greedy,
    max_new_tokens from prunebench.json, default attention) on ``samples``, and its accuracy."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(threads)
    meta = json.loads((Path(path) / "prunebench.json").read_text())
    t0 = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(path)
    task = get_task("shapes")
    t1 = time.perf_counter()
    correct = []
    for b in range(0, len(samples), batch):
        chunk = samples[b: b + batch]
        prompts = [meta["prompt_template"].format(question=s.question) for s in chunk]
        inp = proc(images=[s.image for s in chunk], text=prompts, return_tensors="pt", padding=True)
        out = model.generate(**inp, max_new_tokens=meta["max_new_tokens"], do_sample=False)
        texts = proc.batch_decode(out[:, inp.input_ids.shape[1]:], skip_special_tokens=True)
        correct += [task.score(t, s) for t, s in zip(texts, chunk)]
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "eval_s": t2 - t1, "n": len(samples), "threads": threads,
            "accuracy": float(np.mean(correct)), "load_avg_1min": os.getloadavg()[0]}


def run(path: str | os.PathLike, n: int = 1000, threads: int = 2, timing: bool = True) -> dict:
    """Full measurement used for the model card: unpruned, random/oracle at 1/8, random/cls at 1/4."""
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(threads)
    samples = get_task("shapes").samples("eval", n=n)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation={"vision_config": "eager", "text_config": "sdpa", "": "sdpa"}
    ).eval()
    k8, k4 = M.NUM_PATCHES // 8, M.NUM_PATCHES // 4
    strategies = [("none", None), ("random", k8), ("oracle", k8), ("cls", k8), ("random", k4), ("cls", k4), ("oracle", k4)]
    res = {"model": str(path), "split": "eval", "n": n, "strategies": evaluate(model, samples, strategies)}
    if timing:
        res["timing_hf_generate"] = time_hf_generate(path, samples, threads=threads)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(M.ASSET_DIR))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)
    res = run(args.model, args.n, args.threads, timing=not args.no_timing)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
