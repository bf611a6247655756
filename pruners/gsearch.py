"""`gsearch` (G-Search, Zhao et al., "Accelerating Multimodal Large Language Models by Searching Optimal
Vision Token Reduction", CVPR 2025, arXiv 2412.00556): in-LLM layer-wise visual-token reduction with a
per-layer keep schedule found by a greedy search on calibration data. Doc: docs/methods/gsearch.md.

What: at each pruning layer the currently kept visual tokens are ranked by the instruction tokens'
attention in the previous layer (head mean) and the top ``round(f[l] * n)`` of the image's own ``n``
visual tokens are kept (`pruners._ratio_schedule`, shared with `psigmoid`, which holds the budget
semantics: equivalent tokens <= budget by scaling the schedule's shape; ``budget=None`` runs the
schedule as found, ``chooses_budget``).

Why: the paper finds that the attention ranking of the visual tokens is similar in every layer but
the first, assumes that the number of essential top tokens does not increase with depth, and then
searches, shallow to deep, the least number of tokens each layer needs without a performance drop.

The schedule is DATA, found by `benchmarks.schedule_search` (our G-Search; run it once per model):

    python -m benchmarks.schedule_search model=embedded task=shapes min_fidelity=0.99

which writes ``schedule`` (one keep fraction per decoder layer) and ``found_on`` (the model's weights
fingerprint, `model_identity`) to a ``gsearch`` method config; the embedded model's is the tracked
``conf/method/gsearch.yaml``, so ``method=gsearch`` (and ``make sweep``) runs it there.

Parameters: ``schedule`` = a list of L fractions, or null (default: refused at attach with the
command above, unless the configuration keeps everything or ``depth_scaled`` is set).
``depth_scaled=true`` (with ``schedule=null``): the embedded model's found schedule
(`EMBEDDED_SCHEDULE`) resampled at relative depth to the model's L layers
(`pruners._ratio_schedule.resample_depth`), the documented default for models without a found
schedule (the conformance suite runs it: ``conformance_params``). ``found_on``: the fingerprint of the
model a list schedule was found on; attaching it to another model (or one whose identity cannot be
read) is refused; null skips the check. (Every parameter is typed, `pruners.params.Param`: hence a
separate boolean rather than a string value of ``schedule``.)

Deviations from the paper (no authors' code was released): the search is a bisection per layer on
the tuner's calibration objective (last-token final-state cosine, `benchmarks.tune.objective`) against
a threshold ``min_fidelity``, instead of the paper's per-layer Bayesian optimisation on benchmark
accuracy; see `benchmarks.schedule_search` and the doc page.
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
