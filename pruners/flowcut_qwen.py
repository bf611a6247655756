"""`flowcut_qwen`: FlowCut's CLS-free form, its authors' port to Qwen2-VL (FlowCut repository,
``FlowCut_Qwen/``, README: "also applicable to Qwen2.5-VL"), selected explicitly; `flowcut` is the
LLaVA (CLS) method. docs/methods/flowcut.md "flowcut_qwen" has the algorithm and the three deviations;
docs/methods-pre-llm.md (flowcut_qwen) the source.

Stages ``pre_llm`` + ``llm``: a global-query flow over the vision blocks, run on the probes of the
unpruned tower (`PreLLMContext.vision_qkv`), keeps ``vision_factor x budget`` merged units (the token
is the unit: its score is the sum of its 2x2 patches'); at LLM layer K = ``layer`` the last prompt
token's relation + semantic flow on layer K-1's q/k/v (`LLMLayerContext.layer_qkv`) keeps ``budget``.
Kept units keep their own M-RoPE positions. On a CLIP tower the CLS row is ignored. Each image follows
its own schedule before the LLM; inside it each sample ranks its own real visual tokens (inert slots
score -inf).
"""

from __future__ import annotations

import torch

from pruners.base import LLMLayerContext, ModelInfo, PreLLMContext, PreLLMDecision, Pruner
from pruners.flowcut import entropy_ratio, flowcut_cut
from pruners.params import Param, check_decoder_layer
from pruners.registry import register_pruner


def global_flow(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(relation [n], score [n]) of n tokens of g rows each: the head-mean softmax attention of the rows'
    mean query over the rows, and relation x ||head-mean v||_1, each summed over a token's g rows.

    q, k, v: [H, n * g, Dh], token t's rows at t*g .. t*g + g - 1.
    """
    gq = q.float().mean(1, keepdim=True)  # [H, 1, Dh]
    att = torch.softmax(gq @ k.float().transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1).mean(0)[0]  # [n*g]
    mag = v.float().mean(0).abs().sum(-1)  # [n*g]
    n = q.shape[1] // g
    return att.view(n, g).sum(1), (att * mag).view(n, g).sum(1)


@register_pruner("flowcut_qwen")
class FlowCutQwen(Pruner):
    """FlowCut's Qwen port: global-query flow in the vision encoder, relation + semantic flow in the LLM."""

    stages = ("pre_llm", "llm")
    version = 1
    parameters = {
        "vision_factor": Param(int, 2, low=1, doc="tokens reaching the LLM per budget token (authors: 2)"),
        "layer": Param(int, 2, doc="decoder layer K: layers K.. see only the kept tokens, scored with layer "
                                   "K-1's q/k/v (authors: 2)"),
    }

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        check_decoder_layer("flowcut_qwen", self.params["layer"], info.llm_num_layers)

    # ---- before the LLM: the vision encoder's flow ------------------------------------------------
    def vision_probe_layers(self) -> list[int]:
        return list(range(self.info.vision_feature_layer + 1)) if not self.keeps_all else []

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        B, N, _ = ctx.features.shape
        target = self.budget * self.params["vision_factor"]
        last = self.info.vision_feature_layer
        n_cls = 1 if ctx.info.has_cls else 0
        keep = []
        for b in range(B):
            cand = torch.arange(N)  # surviving tokens, ascending
            cum = None
            for i in range(last + 1):
                if cand.numel() <= target:
                    break
                q, k, v = (x[b, :, n_cls:] for x in ctx.vision_qkv(i))  # [H, N*g, Dh]
                g = q.shape[1] // N
                rows = (cand[:, None] * g + torch.arange(g)).reshape(-1).to(q.device)
                relation, score = global_flow(q[:, rows], k[:, rows], v[:, rows], g)  # [n_cand] each
                cum = score if cum is None else 0.5 * cum + 0.5 * score
                rpl = last - i
                if rpl % 2:
                    continue
                n = cand.numel()
                ratio = float(entropy_ratio(relation[None], torch.ones(1, n, dtype=torch.bool))[0])
                top = cum.topk(n - flowcut_cut(n, target, rpl, ratio)).indices.sort().values.cpu()
                cand, cum = cand[top], cum[top.to(cum.device)]
            keep.append(cand)
        width = max(c.numel() for c in keep)
        if any(c.numel() != width for c in keep):  # one count per batch (each image of a ragged one alone)
            raise ValueError("flowcut_qwen: images of one pre-LLM call kept different counts")
        return PreLLMDecision(keep=torch.stack(keep).to(ctx.features.device),
                              info={"flowcut_qwen_vision_tokens": width})

    # ---- inside the LLM: relation + semantic flow of the last token ----------------------------------
    def llm_layers(self) -> list[int]:
        return [self.params["layer"]]

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        q, k, v = ctx.layer_qkv(self.params["layer"] - 1, "last")  # [B, Hq, 1, hd], [B, Hkv, Lc, hd] x 2
        B, Hq, _, hd = q.shape
        groups = Hq // k.shape[1]
        vis = ctx.visual_pos  # [B, Nv]
        idx = vis[:, None, :, None].expand(B, k.shape[1], vis.shape[1], hd)
        kv, vv = k.gather(2, idx).repeat_interleave(groups, 1), v.gather(2, idx).repeat_interleave(groups, 1)
        last = (torch.arange(ctx.key_mask.shape[1], device=vis.device) * ctx.key_mask).argmax(1)  # [B]
        v_last = v.gather(2, last[:, None, None, None].expand(B, v.shape[1], 1, hd)).repeat_interleave(groups, 1)
        real = ctx.key_mask.gather(1, vis)[:, None, None, :]  # [B, 1, 1, Nv]

        def rows(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:  # [B, Nv] head-mean softmax
            s = (query.float() @ keys.float().transpose(-1, -2)) * hd**-0.5  # [B, Hq, 1, Nv]
            return torch.softmax(s.masked_fill(~real, float("-inf")), dim=-1).mean(1)[:, 0]

        mag = vv.float().mean(1).abs().sum(-1)  # [B, Nv]
        score = (rows(q, kv) + rows(v_last, vv)) * mag
        score = score.masked_fill(~real[:, 0, 0], float("-inf"))
        return ctx.keep_top(score, self.budget)
