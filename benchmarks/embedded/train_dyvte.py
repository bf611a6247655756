"""Train `dyvte`'s exit routers on the frozen embedded model: ``python -m benchmarks.embedded.train_dyvte``.

Follows the authors' recipe (DoubtedSteam/DyVTE, ``LlamaForCausalLM.forward`` training branch of
``llava/model/language_model/modeling_llama.py``, ``scripts/v1_5/finetune_visual_gate.sh``), adapted to
the ``shapes`` task and a CPU (docs/methods/dyvte.md lists the differences):

- the MLLM is frozen; only the routers train (theirs: ``requires_grad`` only for ``visual_gates``);
- label of (sample, layer K): run the answer teacher-forced once unpruned and once with every visual
  token removed from layer K on (here: the `vte` pruner at ``layer=K``, the same exit the engine runs
  for `dyvte`); "exit" (1) when the exit run's argmax agrees with the unpruned run's on more than 99% of
  the answer tokens (answer word and end token) **and** its answer loss is below 1.03 x the unpruned
  loss, else "keep" (0);
- router input: the text tokens' state at layer K's input (`pruners.dyvte.text_state`), detached;
  loss: cross-entropy with class weights (1, 1); AdamW, weight decay 0, cosine schedule with 3% warmup.
  They draw one random layer per step over 1% of LLaVA-665k; here every (sample, layer) pair of
  ``--n-train`` samples of the shapes training stream is labelled once (features and labels cached),
  and each layer's router trains on its own pairs for ``--epochs`` epochs (seeded shuffles).

Writes ``<out>/router.safetensors``, ``<out>/router.json`` (architecture, candidate layers, threshold,
the model identity `dyvte` checks, training settings and measured metrics) and ``<out>/README.md``.
Default ``--out``: ``benchmarks/assets/dyvte/embedded`` (the shipped folder). Deterministic for a seed
(single thread by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pruners import dyvte as D

log = logging.getLogger("train_dyvte")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / D.SHIPPED_EMBEDDED
AGREE_MIN = 0.99  # the authors' "accuracy > 0.99"
LOSS_RATIO = 1.03  # the authors' "loss < ori_loss * 1.03"


# ---- data: features and labels ------------------------------------------------------------------------
def instruction_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_id: int) -> torch.Tensor:
    """[B, Ni] positions of the real tokens after each sample's last image token (-1 padded)."""
    B, L = input_ids.shape
    ar = torch.arange(L).expand(B, L)
    last_img = torch.where(input_ids == image_id, ar, -1).max(1).values  # [B]
    after = attention_mask.bool() & (ar > last_img[:, None])
    n = int(after.sum(1).max())
    out = torch.full((B, n), -1, dtype=torch.long)
    for b in range(B):
        p = ar[b][after[b]]
        out[b, : p.numel()] = p
    return out


def answer_ids(tok: Any, answer: str) -> list[int]:
    ids = tok.convert_tokens_to_ids(answer.split())
    if tok.unk_token_id is not None and tok.unk_token_id in ids:
        raise ValueError(f"answer {answer!r} has an out-of-vocabulary word")
    return list(ids) + [tok.eos_token_id]


def teacher_forced(enc: dict[str, torch.Tensor], answers: list[list[int]], pad: int):
    """(ids [B, L'], mask, target ids [B, A]) of prompt + answer, left padded (the position predicting
    answer token j is the token before it). All answers have length A."""
    A = len(answers[0])
    if any(len(a) != A for a in answers):
        raise ValueError("teacher forcing here needs answers of one length per batch")
    seqs = [enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist() + answers[b] for b in range(len(answers))]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, L - len(s):], mask[b, L - len(s):] = torch.tensor(s), 1
    return ids, mask, torch.tensor(answers)


def answer_stats(logits: torch.Tensor, tgt: torch.Tensor):
    """(per-sample mean CE [B], argmax [B, A]) at the answer-predicting positions: the A positions before
    the last (left padding ends every sequence at the last column; after an exit the engine returns
    logits of the remaining, text, columns only, so positions are counted from the end)."""
    A = tgt.shape[1]
    lg = logits.float()[:, -(A + 1):-1]  # [B, A, V]
    ce = F.cross_entropy(lg.transpose(1, 2), tgt, reduction="none").mean(1)
    return ce, lg.argmax(-1)


def label_batch(model: Any, lm: Any, samples: list[Any], layers: list[int]) -> dict[str, torch.Tensor]:
    """Features [B, n_layers, 2D], labels [B, n_layers] (1 = exit is safe), per-layer first-answer-token
    correctness [B, n_layers] and the unpruned one [B] for a batch of samples."""
    from mllm_adapters import apply_pruner

    proc, tok = lm.processor, lm.processor.tokenizer
    enc = proc(images=[s.image.convert("RGB") for s in samples], text=[lm.prompt(s.question) for s in samples],
               padding=True, return_tensors="pt")
    image_id = int(model.config.image_token_id)
    with torch.inference_mode():
        hs = model(**enc, output_hidden_states=True, use_cache=False).hidden_states  # [L+1] inputs of each layer
    instr = instruction_positions(enc["input_ids"], enc["attention_mask"], image_id)
    feats = torch.stack([D.text_state(hs[k], instr, enc["attention_mask"].bool()) for k in layers], 1)
    answers = [answer_ids(tok, s.answer) for s in samples]
    ids, mask, tgt = teacher_forced(enc, answers, tok.pad_token_id)
    pix = enc["pixel_values"]
    with torch.inference_mode():
        full_ce, full_arg = answer_stats(model(input_ids=ids, attention_mask=mask, pixel_values=pix,
                                               use_cache=False).logits, tgt)
    labels, correct = [], []
    for k in layers:
        with apply_pruner(model, "vte", layer=k), torch.inference_mode():
            ce, arg = answer_stats(model(input_ids=ids, attention_mask=mask, pixel_values=pix,
                                         use_cache=False).logits, tgt)
        agree = (arg == full_arg).float().mean(1)
        labels.append((agree > AGREE_MIN) & (ce < full_ce * LOSS_RATIO))
        correct.append(arg[:, 0] == tgt[:, 0])
    return {"features": feats.float(), "labels": torch.stack(labels, 1).long(),
            "correct": torch.stack(correct, 1), "full_correct": full_arg[:, 0] == tgt[:, 0]}


def build_set(model: Any, lm: Any, samples: list[Any], layers: list[int], batch: int) -> dict[str, torch.Tensor]:
    parts = [label_batch(model, lm, samples[i: i + batch], layers) for i in range(0, len(samples), batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ---- training -------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, base: float, warmup_ratio: float) -> float:
    warm = max(1, math.ceil(total * warmup_ratio))
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train_routers(train: dict[str, torch.Tensor], layers: list[int], args: argparse.Namespace) -> tuple[D.RouterBank, list[float]]:
    """Each layer's router on its (features, labels) pairs; returns the bank and the mean loss per epoch."""
    torch.manual_seed(args.seed)
    in_dim = train["features"].shape[-1]
    bank = D.RouterBank(layers, in_dim, args.hidden)
    # the authors' init_weight.py: xavier_uniform (no biases here); w1 is scaled by 1 / the RMS of its
    # layer's training features so the first logits are O(1) (the embedded model's residual stream has
    # RMS ~30, LLaVA's ~1): an initialisation choice, the architecture is theirs
    for j, k in enumerate(layers):
        r = bank.routers[str(k)]
        torch.nn.init.xavier_uniform_(r.w1.weight, 1)
        torch.nn.init.xavier_uniform_(r.w2.weight, 1)
        rms = float(train["features"][:, j].pow(2).mean().sqrt().clamp(min=1e-6))
        with torch.no_grad():
            r.w1.weight.div_(rms)
    opt = torch.optim.AdamW(bank.parameters(), lr=args.lr, weight_decay=0.0)
    n = train["features"].shape[0]
    steps_per_epoch = math.ceil(n / args.batch)
    total = steps_per_epoch * args.epochs
    weights = torch.tensor([1.0, 1.0])
    g = torch.Generator().manual_seed(args.seed)
    curve, step = [], 0
    bank.train()
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=g)
        tot, cnt = 0.0, 0
        for i in range(0, n, args.batch):
            idx = perm[i: i + args.batch]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.lr, args.warmup_ratio)
            loss = 0.0
            for j, k in enumerate(layers):  # every layer's router on the same samples: one step
                logits = bank(k, train["features"][idx, j])
                loss = loss + F.cross_entropy(logits, train["labels"][idx, j], weight=weights)
            loss = loss / len(layers)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
            step += 1
        curve.append(tot / cnt)
    return bank.eval().requires_grad_(False), curve


def _acc(pred: torch.Tensor, lab: torch.Tensor, mask: torch.Tensor) -> float | None:
    return round(float((pred[mask] == lab[mask]).float().mean()), 4) if bool(mask.any()) else None


@torch.no_grad()
def evaluate(bank: D.RouterBank, data: dict[str, torch.Tensor], layers: list[int], threshold: float) -> dict[str, Any]:
    """Exit-decision accuracy per layer (all / on keep labels / on exit labels, exit-label rate) and the
    simulated dynamic exit: each sample exits at the first layer whose router says exit."""
    per_layer = {}
    decide = []
    for j, k in enumerate(layers):
        p = D.exit_probability(bank, k, data["features"][:, j])
        pred = (p > threshold).long()
        lab = data["labels"][:, j]
        decide.append(pred.bool())

        per_layer[str(k)] = {"accuracy": _acc(pred, lab, torch.ones_like(lab, dtype=torch.bool)),
                             "keep_accuracy": _acc(pred, lab, lab == 0), "exit_accuracy": _acc(pred, lab, lab == 1), "exit_label_rate": round(float(lab.float().mean()), 4),
                             "exit_predicted_rate": round(float(pred.float().mean()), 4)}
    dec = torch.stack(decide, 1)  # [N, n_layers]
    n = dec.shape[0]
    first = torch.where(dec.any(1), dec.float().argmax(1), torch.full((n,), -1))
    hist: dict[str, int] = {}
    safe, correct = 0, 0
    for b in range(n):
        j = int(first[b])
        key = "none" if j < 0 else str(layers[j])
        hist[key] = hist.get(key, 0) + 1
        if j < 0:
            safe += 1
            correct += int(data["full_correct"][b])
        else:
            safe += int(data["labels"][b, j])
            correct += int(data["correct"][b, j])
    overall = (dec.long() == data["labels"]).float().mean()
    return {"decision_accuracy": round(float(overall), 4), "per_layer": per_layer,
            "dynamic_exit": {"exit_layer_histogram": dict(sorted(hist.items())), "safe_exit_rate": round(safe / n, 4),
                             "first_token_accuracy": round(correct / n, 4),
                             "unpruned_first_token_accuracy": round(float(data["full_correct"].float().mean()), 4)}}


# ---- output ---------------------------------------------------------------------------------------------
def write_readme(out: Path, meta: dict[str, Any]) -> None:
    t, m = meta["training"], meta["metrics"]
    rows = []
    for k in meta["router"]["layers"]:
        tr, va = m["train"]["per_layer"][str(k)], m["val"]["per_layer"][str(k)]
        rows.append(f"| {k} | {tr['exit_label_rate']:.3f} | {tr['accuracy']:.3f} | {va['exit_label_rate']:.3f} | "
                    f"{va['accuracy']:.3f} | {va['keep_accuracy'] if va['keep_accuracy'] is not None else '-'} | "
                    f"{va['exit_accuracy'] if va['exit_accuracy'] is not None else '-'} |")
    dyn = m["val"]["dynamic_exit"]
    text = f"""# `dyvte` routers for the embedded model

Exit routers of `dyvte` (pruners/dyvte.py, docs/methods/dyvte.md), trained on the frozen embedded model
(benchmarks/assets/embedded, config.json sha256 `{meta['model']['config_sha256']}`, model.safetensors sha256
`{meta['model']['weights_sha256'].get('model.safetensors')}`) by `benchmarks/embedded/train_dyvte.py`. Written by
that script; do not edit by hand.

Reproduce (deterministic; {t['threads']} thread; here labelling {t['labelling_seconds']} s (model forwards, on 2 cores
shared with other jobs) + training and evaluation {t['training_seconds']} s):

    .venv/bin/python -m benchmarks.embedded.train_dyvte {' '.join(t['argv'])}

- router per layer K in {meta['router']['layers']}: Linear({meta['router']['in_dim']}, {meta['router']['hidden']}) -> GELU ->
  Linear({meta['router']['hidden']}, 2), no biases; input `[mean text state after the image except the last token,
  last token]` at layer K's input; exit when p(exit) > {meta['threshold']}.
- data: {t['n_train']} samples of the shapes training stream (seed {t['seed']}), {t['n_val']} of the val split;
  label "exit" when the exit at K keeps the answer's argmax (> {AGREE_MIN}) and its loss < {LOSS_RATIO} x unpruned.
- training: AdamW lr {t['lr']}, weight decay 0, cosine with {t['warmup_ratio']:.0%} warmup, batch {t['batch']},
  {t['epochs']} epochs; loss per epoch {', '.join(f'{x:.4f}' for x in t['loss_curve'])}.

| layer K | train exit-label rate | train decision acc. | val exit-label rate | val decision acc. | val keep acc. | val exit acc. |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Decision accuracy over all (sample, layer) pairs: train {m['train']['decision_accuracy']:.4f}, val {m['val']['decision_accuracy']:.4f}.

Simulated dynamic exit on the val samples (first layer whose router says exit): exit layers
{dyn['exit_layer_histogram']}; safe exits (label "exit" at the chosen layer, or no exit) {dyn['safe_exit_rate']:.4f};
first answer token correct {dyn['first_token_accuracy']:.4f} (unpruned {dyn['unpruned_first_token_accuracy']:.4f}).
"""
    (out / "README.md").write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: the shipped one)")
    p.add_argument("--model-path", default=None, help="embedded model folder (default: benchmarks/assets/embedded)")
    p.add_argument("--n-train", type=int, default=1500, help="training samples (shapes training stream)")
    p.add_argument("--n-val", type=int, default=500, help="validation samples (shapes val split)")
    p.add_argument("--hidden", type=int, default=128, help="router hidden width (authors: 2048 for 4096-wide LLMs)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64, help="router training batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--threshold", type=float, default=0.5, help="exit when p(exit) > threshold (authors: argmax)")
    p.add_argument("--model-batch", type=int, default=50, help="samples per model forward while labelling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-cache", default=None, help="a .pt file caching the labelled sets (reused when it matches)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    for name in ("n_train", "n_val", "hidden", "epochs", "batch", "model_batch", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 0.0 < a.threshold < 1.0:
        p.error(f"--threshold must be in (0, 1), got {a.threshold}")
    if a.lr <= 0 or not 0.0 <= a.warmup_ratio < 1.0:
        p.error("--lr must be > 0 and --warmup-ratio in [0, 1)")
    # the command as recorded (README, router.json): without the options that do not change the result
    a.argv, skip = [], False
    for tok in ([] if argv is None else list(argv)):
        if skip:
            skip = False
        elif tok in ("--out", "--label-cache"):
            skip = True
        elif not tok.startswith(("--out=", "--label-cache=")):
            a.argv.append(tok)
    return a


def run(args: argparse.Namespace, lm: Any = None, samples: tuple[list, list] | None = None) -> dict[str, Any]:
    """Label, train, evaluate and write ``args.out``; ``lm`` reuses an already loaded embedded model
    (`benchmarks.models.LoadedModel`, float32, eager attention) instead of loading ``--model-path``, and
    ``samples`` = (train, val) replaces the task's splits (tests)."""
    from safetensors.torch import save_file

    from benchmarks.models import load_model
    from benchmarks.tasks import get_task
    from benchmarks.tune import model_info

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if lm is None:
        lm = load_model({"name": "embedded", "source": "embedded", "path": args.model_path, "dtype": "float32",
                         "attn_implementation": "eager", "prompt_template": None})
    model = lm.model
    info = model_info(model)
    layers = list(range(1, info.llm_num_layers))  # the authors' routers after every layer but the last
    task = get_task("shapes")
    if samples is None:
        train_s = task.samples("train", n=args.n_train, seed=args.seed)
        val_s = task.samples("val", n=args.n_val)
    else:
        train_s, val_s = samples
    log.info("labelling %d train + %d val samples at layers %s", len(train_s), len(val_s), layers)
    cache = Path(args.label_cache) if args.label_cache else None
    key = {"n_train": args.n_train, "n_val": args.n_val, "seed": args.seed, "weights": lm.weights, "layers": layers}
    cached = torch.load(cache) if cache is not None and cache.is_file() else None
    if cached is not None and cached["key"] == key:
        train, val = cached["train"], cached["val"]
        t_label = cached.get("label_seconds")  # the run that labelled them
    else:
        train = build_set(model, lm, train_s, layers, args.model_batch)
        val = build_set(model, lm, val_s, layers, args.model_batch)
        t_label = time.perf_counter() - t0
        if cache is not None:
            torch.save({"key": key, "train": train, "val": val, "label_seconds": t_label}, cache)
    t1 = time.perf_counter()
    bank, curve = train_routers(train, layers, args)
    metrics = {"train": evaluate(bank, train, layers, args.threshold), "val": evaluate(bank, val, layers, args.threshold)}
    t_train = time.perf_counter() - t1
    seconds = (t_label or 0.0) + t_train
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in bank.state_dict().items()}, str(out / D.ROUTER_FILE))
    identity = D.model_identity(info, ["model.safetensors"])
    meta = {
        "format": D.FORMAT, "format_version": D.FORMAT_VERSION,
        "router": {"layers": layers, "in_dim": bank.in_dim, "hidden": bank.hidden, "activation": "gelu", "bias": False,
                   "input": "cat(mean of text tokens after the image except the last, last token) at layer K's input",
                   "output": "logits (keep, exit)"},
        "threshold": args.threshold,
        "model": {"name": "embedded", "weights_fingerprint": lm.weights, **identity},
        "training": {"argv": args.argv, "task": "shapes", "seed": args.seed, "n_train": args.n_train, "n_val": args.n_val,
                     "hidden": args.hidden, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
                     "warmup_ratio": args.warmup_ratio, "weight_decay": 0.0, "class_weights": [1.0, 1.0],
                     "label_rule": f"exit iff argmax agreement with unpruned > {AGREE_MIN} on the answer tokens and "
                                   f"answer CE < {LOSS_RATIO} x unpruned (teacher forced)",
                     "threads": args.threads, "labelling_seconds": None if t_label is None else round(t_label, 1),
                     "training_seconds": round(t_train, 1), "seconds": round(seconds, 1),
                     "loss_curve": [round(x, 5) for x in curve]},
        "metrics": metrics,
    }
    (out / D.ROUTER_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    write_readme(out, meta)
    log.info("wrote %s in %.0f s; val decision accuracy %.4f", out, seconds, metrics["val"]["decision_accuracy"])
    return meta


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    main()
