"""Stage 2, the LLM stage: tower frozen, projector + Llama trained on packed turns with the grounding
loss; validated on the val split, the best checkpoint exported; resumes from its checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.embedded import model as M
from benchmarks.embedded.train.common import log, lr_at
from benchmarks.embedded.train.data import Encoder, bg_keep_fraction, pad_batch, stage2_batch, stage2_inputs
from benchmarks.embedded.train.losses import grounding_loss, head_grounding_loss
from benchmarks.embedded.train.stage1 import Stage1
from benchmarks.tasks.shapes import eval_keys


@torch.no_grad()
def validate(model, enc: Encoder, samples, batch: int = 50) -> dict:
    """Single-turn greedy first-token accuracy per family on ``samples``."""
    model.eval()
    correct: dict[str, list[float]] = {}
    for b in range(0, len(samples), batch):
        chunk = samples[b: b + batch]
        feats = M.vision_features(model, M.pixel_values([s.image for s in chunk]))
        ids, am = pad_batch([enc.prompt(s.question) for s in chunk], enc.pad, left=True)
        pred = M.llm_logits(model, feats, ids, am)[:, -1].argmax(-1)
        for s, p in zip(chunk, pred.tolist()):
            correct.setdefault(s.family, []).append(float(enc.tok.convert_ids_to_tokens(p) == s.answer))
    res = {f: float(np.mean(v)) for f, v in sorted(correct.items())}
    res["overall"] = float(np.mean([x for v in correct.values() for x in v]))
    return res


GROW_ZERO_COLUMNS = ("o_proj.weight", "down_proj.weight")  # output maps of the added heads / MLP units


@torch.no_grad()
def grow_llm(model: torch.nn.Module, small: dict[str, torch.Tensor]) -> list[str]:
    """Load the state dict ``small`` of a LLaVA with fewer LLM heads or a narrower MLP into the larger
    ``model``, function-preserving (Net2Net-style): every old weight goes to the leading block of the
    new one; the added heads' q/k/v rows and the added MLP units' gate/up rows keep their fresh
    initialisation, and their columns in o_proj / down_proj are zero, so the grown model computes
    exactly what the small one did and the new capacity starts training from there. Returns the names
    of the grown parameters."""
    grown = []
    for name, p in model.state_dict().items():
        old = small[name]
        if old.shape == p.shape:
            p.copy_(old)
            continue
        if old.dim() != p.dim() or any(o > n for o, n in zip(old.shape, p.shape)):
            raise ValueError(f"cannot grow parameter {name!r} from {tuple(old.shape)} to {tuple(p.shape)}")
        if name.endswith(GROW_ZERO_COLUMNS):
            p.zero_()
        p[tuple(slice(0, o) for o in old.shape)] = old
        grown.append(name)
    return grown


def run_stage2(args, out: Path, s1: Stage1, curve) -> None:
    from benchmarks.tasks import get_task

    model, _ = M.build_llava(args.seed + 2, args.llm_heads, args.llm_mlp)
    if args.attn_aux_weight > 0:
        model.set_attn_implementation("eager")  # the grounding loss reads one layer's attention probabilities
    if args.s2_init == "fanin":
        # Llama's default init (std 0.02) makes attention scores x^T Wq^T Wk y and the value path Wo Wv x
        # products of two tiny matrices: each one's gradient is proportional to the other, a saddle that
        # kept content-addressed retrieval at the answer prior for thousands of steps. Start the
        # attention projections at std 1/sqrt(fan_in) instead (as for a plain linear layer).
        g = torch.Generator().manual_seed(args.seed + 3)
        with torch.no_grad():
            for name, p in model.model.language_model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    model.model.vision_tower.requires_grad_(False)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    opt = torch.optim.AdamW(trainable, lr=args.s2_lr, weight_decay=0.0, betas=(0.9, 0.98))
    enc = Encoder()
    keys = eval_keys()
    val = get_task("shapes").samples("val", n=args.val_n)
    step, best, since_best, elapsed0, warm_from = 0, -1.0, 0, 0.0, 0
    ck = out / "stage2.pt"
    if ck.exists() and not args.restart_stage2:
        st = torch.load(ck, weights_only=False)
        model.load_state_dict(st["model"])
        step, best, elapsed0 = st["step"], st["best"], st.get("elapsed", 0.0)
        if st.get("phase") == args.phase:
            opt.load_state_dict(st["opt"])
            since_best, warm_from = st["since_best"], st.get("warm_from", 0)
            log.info("resuming stage 2 from step %d (best %.4f, %.1f min done)", step, best, elapsed0 / 60)
        else:  # a new --phase continues the previous phase's weights with a fresh optimizer
            since_best, warm_from = 0, step
            log.info("phase %r starts at stage-2 step %d from the checkpoint of phase %r; fresh optimizer",
                     args.phase, step, st.get("phase"))
    elif args.grow_from:
        st = torch.load(args.grow_from, weights_only=False)
        grown = grow_llm(model, st["model"])
        step, elapsed0, warm_from = st["step"], st.get("elapsed", 0.0), st["step"]  # fresh optimizer: warm up again
        log.info("grew %d LLM parameters of %s (step %d) to %d heads, MLP %d; fresh optimizer",
                 len(grown), args.grow_from, step, args.llm_heads, args.llm_mlp)
    # The tower is the run's stage-1 tower, also on resume (a run whose stage 1 was continued with new
    # targets, e.g. --count-map, continues its LLM on the new tower).
    model.model.vision_tower.load_state_dict(s1.vision.state_dict())
    t0, agg, aux_agg = time.time(), [], []

    def state() -> dict:
        return {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": best,
                "since_best": since_best, "elapsed": elapsed0 + time.time() - t0, "warm_from": warm_from,
                "phase": args.phase}

    while step < args.stage2_steps:
        elapsed = elapsed0 + time.time() - t0
        if args.stage2_minutes and elapsed > 60 * args.stage2_minutes:
            log.info("stage 2 time budget of %.0f min reached at step %d", args.stage2_minutes, step)
            break
        model.train()
        model.model.vision_tower.eval()
        progress = elapsed / (60 * args.stage2_minutes) if args.stage2_minutes else None
        for gp in opt.param_groups:
            # A fresh optimizer (--grow-from, a new --phase) warms up again and its cosine runs from its own
            # first step to --stage2-steps.
            gp["lr"] = lr_at(step - warm_from, args.s2_lr, 300, args.stage2_steps - warm_from, progress=progress)
        images, scenes, seqs, tgts, grounding = stage2_batch(args, step, enc, keys)
        with torch.no_grad():
            hv = M.vision_hidden(model.model.vision_tower, M.pixel_values(images)).hidden_states[-2][:, 1:]  # [B, 144, Dv]
        kept, ids, am, pos, tg, keeps = stage2_inputs(args, step, enc, hv, scenes, seqs, tgts)
        feats = model.model.multi_modal_projector(torch.cat(kept))  # [sum k_i, D], row-major like the placeholders
        aux_w = args.attn_aux_weight if step < args.attn_aux_steps else 0.0
        lm_out = M.llm_forward(model, feats, ids, am, pos, output_attentions=aux_w > 0)
        loss = F.cross_entropy(lm_out.logits.flatten(0, 1), tg.flatten(), ignore_index=-100)  # logits [B, L, V]
        if aux_w > 0:
            g_fn = grounding_loss if args.grounding_mode == "mass" else head_grounding_loss
            g_loss = g_fn(lm_out.attentions[args.attn_aux_layer], seqs, keeps, grounding)
            aux_agg.append(g_loss.item())
            loss = loss + aux_w * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        agg.append(loss.item())
        if step % args.log_every == 0:
            rec = {"stage": 2, "step": step, "time_s": round(elapsed0 + time.time() - t0, 1), "loss": round(float(np.mean(agg)), 4),
                   "bg_keep": round(bg_keep_fraction(args, step), 3)}
            if aux_agg:
                rec["grounding_loss"] = round(float(np.mean(aux_agg)), 4)
            log.info(json.dumps(rec))
            curve.write(json.dumps(rec) + "\n")
            curve.flush()
            agg, aux_agg = [], []
        if step % args.eval_every == 0 or step == args.stage2_steps:
            res = validate(model, enc, val)
            score = min(v for k, v in res.items() if k != "overall") + res["overall"]
            rec = {"stage": 2, "step": step, "time_s": round(elapsed0 + time.time() - t0, 1), "val": res, "score": score}
            log.info(json.dumps(rec))
            curve.write(json.dumps(rec) + "\n")
            curve.flush()
            if score > best:
                best, since_best = score, 0
                M.export(model, s1.text, s1.visual_projection.weight, out / "best")
                (out / "best" / "train_state.json").write_text(json.dumps(rec) + "\n")
                log.info("exported new best (score %.4f) to %s", score, out / "best")
            else:
                since_best += 1
            torch.save(state(), ck)
            if args.patience and since_best >= args.patience:
                log.info("early stop: no val improvement in %d evaluations", since_best)
                break
        elif step % args.ckpt_every == 0:
            torch.save(state(), ck)
    torch.save(state(), ck)
    log.info("stage 2 stopped at step %d, best score %.4f", step, best)
