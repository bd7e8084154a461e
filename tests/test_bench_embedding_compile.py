"""The embedding benchmark's torch.compile case: its child process, its time limit and its knob.

On a GPU the case compiles a ViT with inductor (about a minute); here the same machinery runs with
torch.compile's ``eager`` backend on a tiny model, so what is checked is what can break on any
machine: the child is started, measured and read back, a child over its limit is stopped and
reported rather than waited for, and the knob is parsed strictly.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from bench.embedding import (
    COMPILE_LIMIT_ENV,
    DEFAULT_COMPILE_LIMIT_S,
    compile_case,
    compile_limit_s,
    config,
)


@pytest.fixture
def tiny_vit():
    cfg = replace(config(True, "cpu"), batch=4)
    (case,) = [m for m in cfg.models if m.name == cfg.compile_model]
    return case, cfg


@pytest.mark.timeout(120)
def test_compile_case_measures_compiled_against_eager_in_a_child(tiny_vit) -> None:
    case, cfg = tiny_vit
    result = compile_case(case, cfg, backend="eager", limit_s=90)
    assert isinstance(result, dict) and "error" not in result, result
    assert result["model"] == case.name and result["batch"] == 4 and result["buckets"] == [4]
    assert result["backend"] == "eager" and result["dtype"] == "float32"
    assert result["images_per_s"]["eager"] > 0 and result["images_per_s"]["compiled"] > 0
    assert result["compiled_vs_eager"] == pytest.approx(
        result["images_per_s"]["compiled"] / result["images_per_s"]["eager"], rel=0.01
    )
    assert result["compile_s"] is not None and result["compile_s"] >= 0
    # The compiled bucket computes what the eager forward computes.
    assert result["min_cosine_vs_eager"] > 0.9999
    assert result["limit_s"] == 90 and 0 < result["wall_s"] < 90


@pytest.mark.timeout(60)
def test_compile_case_is_stopped_at_its_limit(tiny_vit) -> None:
    case, cfg = tiny_vit
    start = time.perf_counter()
    result = compile_case(case, cfg, backend="eager", limit_s=0.5)  # less than the child's imports
    assert time.perf_counter() - start < 15
    assert isinstance(result, dict)
    assert "0.5 s limit" in result["error"] and COMPILE_LIMIT_ENV in result["error"]


def test_compile_case_is_skipped_at_zero(tiny_vit) -> None:
    case, cfg = tiny_vit
    assert compile_case(case, replace(cfg, compile_limit_s=0.0)) == f"skipped ({COMPILE_LIMIT_ENV}=0)"


def test_compile_limit_knob(monkeypatch) -> None:
    monkeypatch.delenv(COMPILE_LIMIT_ENV, raising=False)
    assert compile_limit_s() == DEFAULT_COMPILE_LIMIT_S
    monkeypatch.setenv(COMPILE_LIMIT_ENV, "45")
    assert compile_limit_s() == 45.0 and config(False, "cuda").compile_limit_s == 45.0
    monkeypatch.setenv(COMPILE_LIMIT_ENV, "0")
    assert compile_limit_s() == 0.0
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv(COMPILE_LIMIT_ENV, bad)
        with pytest.raises(ValueError, match=COMPILE_LIMIT_ENV):
            compile_limit_s()


def test_the_gpu_config_compiles_vit_b() -> None:
    assert config(False, "cuda").compile_model == "vit_b16"
    assert config(False, "cpu").compile_model == "vit_s16"
