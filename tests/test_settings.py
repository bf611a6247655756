"""Every runner setting is checked before any model loads, with an error naming it and what is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from benchmarks import run as runner

CONF = Path(__file__).resolve().parent.parent / "conf"


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading any model (or even reading a checkpoint's weights) fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(runner, "get_model", refuse)
    monkeypatch.setattr(runner, "load_model", refuse)


BAD = [
    ("batch_size=0", r"batch_size=0 is not supported; accepted: an integer >= 1"),
    ("batch_size=-2", r"batch_size=-2 is not supported; accepted: an integer >= 1"),
    ("n_samples=0", r"n_samples=0 is not supported; accepted: null .* or an integer >= 1"),
    ("latency.n_samples=-1", r"latency.n_samples=-1 is not supported; accepted: an integer >= 0"),
    ("latency.warmup=-1", r"latency.warmup=-1 is not supported"),
    ("latency.decode_tokens=1", r"latency.decode_tokens=1 is not supported; accepted: an integer >= 2"),
    ("budgets=[]", r"budgets=\[\] runs nothing; accepted: a non-empty list"),
    ("budgets=[0]", r"budgets: 0 is not a positive int, a fraction in \(0, 1\), null or 'auto'"),
    ("budgets=[145]", r"budgets: 145 is above the 144 visual tokens per image of model 'embedded'"),
    ("results_dir=", r"results_dir='' is not supported; accepted: a non-empty folder path"),
    ("num_threads=0", r"num_threads=0 is not supported; accepted: null .* or an integer >= 1"),
    ("device=gpu", r"device='gpu' is not supported; accepted: auto, cpu, cuda, cuda:N"),
    ("+model.model_class=pipeline", r"model.model_class='pipeline' for model 'embedded' is not supported; accepted: "
                                   r".*LlavaForConditionalGeneration, LlavaNextForConditionalGeneration"),
    ("model.dtype=float8", r"model.dtype='float8' is not supported; accepted: auto, float32, float16, bfloat16"),
    ("model.source=pip", r"model.source='pip' for model 'embedded' is not supported"),
    ("seeds=[]", r"seeds=\[\] is not supported"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_setting_fails_before_the_model_loads(tmp_path, no_model_load, override, message):
    overrides = ["model=embedded", f"results_dir={tmp_path / 'r'}", "progress=false", override]
    if override == "results_dir=":
        overrides.remove(f"results_dir={tmp_path / 'r'}")
    with pytest.raises(ValueError, match=message):
        runner.run(_cfg(overrides))
    assert not (tmp_path / "r" / "cells").exists()


def test_anyres_budgets_are_checked_against_the_config_too(tmp_path, no_model_load):
    with pytest.raises(ValueError, match=r"budgets: 89 is above the 88 visual tokens of the longest image run"):
        runner.run(_cfg(["model=tiny-next", f"results_dir={tmp_path}", "budgets=[89]"]))


def test_good_settings_pass_unchanged():
    from benchmarks.settings import check_settings

    s = check_settings(_cfg(["model=tiny", "latency.n_samples=0", "num_threads=null", "seeds=[0,1]"]))
    assert s.batch_size == 16 and s.latency.n_samples == 0 and s.num_threads is None and s.seeds == [0, 1]
    assert s.budgets == [None, 72, 36, 18]
