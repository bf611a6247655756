"""`gsearch` (G-Search, Zhao et al., "Accelerating Multimodal Large Language Models by Searching Optimal
Vision Token Reduction", CVPR 2025, arXiv 2412.00556): in-LLM layer-wise visual-token reduction with a
per-layer keep schedule found by a greedy search on calibration data. Doc: docs/methods/gsearch.md.

The runtime (ranking by the instruction tokens' attention in the previous layer, budget = equivalent
tokens by scaling the schedule's shape) is `pruners._ratio_schedule`, shared with `psigmoid`;
``budget=None`` runs the schedule as found (``chooses_budget``). The schedule is DATA, found once per
model by `benchmarks.schedule_search`; the embedded model's is ``conf/method/gsearch.yaml``. Contract:
``schedule=null`` is refused at attach (with the command that finds one) unless nothing is pruned or
``depth_scaled=true`` (`EMBEDDED_SCHEDULE` resampled to the model's depth); a list schedule attached to
a model other than its ``found_on`` (`model_identity`), or to one of unknown identity, is refused.
No authors' code exists; the deviations (bisection on the tuner's objective instead of per-layer
Bayesian optimisation on accuracy) are on the doc page.
"""

from __future__ import annotations

from pathlib import Path

from pruners._ratio_schedule import RatioSchedulePruner, check_fractions, resample_depth
from pruners.base import ModelInfo
from pruners.fingerprint import weights_fingerprint
from pruners.params import POSITIONS, Param
from pruners.registry import register_pruner

#: The schedule benchmarks.schedule_search found on the embedded model (8 decoder layers, 144 visual
#: tokens; conf/method/gsearch.yaml holds it with its search record; tests/test_gsearch.py checks that
#: the two agree). ``depth_scaled=true`` resamples it to other depths.
EMBEDDED_SCHEDULE: tuple[float, ...] = (
    1.0, 1.0, 104 / 144, 96 / 144, 89 / 144, 89 / 144, 89 / 144, 83 / 144,  # counts 144 144 104 96 89 89 89 83
)
SEARCH_COMMAND = "python -m benchmarks.schedule_search model=<model config name>"

_identity_memo: dict[str, str] = {}


def model_identity(info: ModelInfo) -> str | None:
    """The identity a found schedule records as ``found_on``: the weights fingerprint of the checkpoint
    folder (`pruners.fingerprint.weights_fingerprint`, the ``model.weights`` every result cell records),
    ``hub:<id>`` for a hub id, None when the model's checkpoint is unknown (built from a config)."""
    where = info.checkpoint_dir
    if not where:
        return None
    if not Path(where).is_dir():
        return f"hub:{where}"
    key = str(Path(where).resolve())
    if key not in _identity_memo:
        _identity_memo[key] = weights_fingerprint(key)
    return _identity_memo[key]


@register_pruner("gsearch")
class GSearch(RatioSchedulePruner):
    """G-Search's found schedule; see the module docstring."""

    version = 1
    parameters = {
        "schedule": Param(list, None, item=float, low=0, high=1,
                          doc="keep fraction per decoder layer (first 1.0, non-increasing); null: refused unless "
                          "depth_scaled (find one with benchmarks.schedule_search)"),
        "depth_scaled": Param(bool, False, doc="with schedule=null: the embedded model's found schedule resampled "
                              "to this model's depth"),
        "found_on": Param(str, None, doc="weights fingerprint of the model the schedule was found on (checked "
                          "at attach); null: not checked"),
        "positions": Param(str, "original", choices=POSITIONS, doc="RoPE positions of the kept tokens"),
    }
    conformance_params = {"depth_scaled": True}

    def check_params(self) -> None:
        s = self.params["schedule"]
        if self.params["depth_scaled"]:
            if s is not None:
                raise ValueError("gsearch: parameters schedule and depth_scaled=true are exclusive (depth_scaled "
                                 "resamples the embedded model's schedule); pass one of them")
            if self.params["found_on"] is not None:
                raise ValueError(f"gsearch: parameter found_on={self.params['found_on']!r} is for a found schedule; "
                                 f"depth_scaled=true is not found on any model: pass found_on=null")
        if s is not None:
            self.params["schedule"] = check_fractions(s, "gsearch")

    @property
    def chooses_budget(self) -> bool:
        # a schedule with no budget: run it as found (the method sets its own token count)
        has = self.params["schedule"] is not None or self.params["depth_scaled"]
        return has and self.budget is None and self.budget_fraction is None

    def attach(self, info: ModelInfo) -> None:
        s = self.params["schedule"]
        prunes = self.budget_fraction is not None or (self.budget is not None and self.budget < info.num_visual_tokens)
        if s is None and not self.params["depth_scaled"] and prunes:
            raise ValueError(
                f"gsearch: no schedule was found for this model ({info.family}, {info.llm_num_layers} decoder layers, "
                f"{info.num_visual_tokens} visual tokens; parameter schedule=null). Find one with `{SEARCH_COMMAND}` "
                f"(it writes a gsearch config with the schedule), or pass method.params.depth_scaled=true "
                f"for the documented default (the embedded model's schedule resampled to this depth)")
        if isinstance(s, list):
            check_fractions(s, "gsearch", n_layers=info.llm_num_layers)
            found = self.params["found_on"]
            if found is not None:
                here = model_identity(info)
                if here != found:
                    raise ValueError(
                        f"gsearch: parameter schedule was found on model {found!r} (found_on) but this model is "
                        f"{here!r}" + (" (its identity is unknown: no checkpoint folder)" if here is None else "")
                        + f"; find a schedule for it with `{SEARCH_COMMAND}`, pass schedule=null depth_scaled=true, or "
                          f"found_on=null to use this schedule anyway")
        super().attach(info)

    def shape(self, info: ModelInfo) -> list[float]:
        s = self.params["schedule"]
        if s is not None:
            return list(s)
        if self.params["depth_scaled"]:
            return resample_depth(EMBEDDED_SCHEDULE, info.llm_num_layers)
        return [1.0] * info.llm_num_layers  # keeps everything (attach refused every pruning configuration)
