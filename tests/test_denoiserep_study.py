"""The DenoiseRep study in its quick form: it runs, and its arms are what they claim to be.

The invariants below fail if the calibration is not the optimum, if the random control does not
match the closed form's size, if the strength knob does nothing, or if the paired statistics are off.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import denoiserep_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("study") / "study.json"
    plot = out.with_suffix(".png")
    assert denoiserep_study.main(["--quick", "--seeds", "2", "--out", str(out), "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 1000
    return json.loads(out.read_text())["figures"]


def test_every_arm_of_both_kinds_is_measured_with_paired_intervals(study: dict) -> None:
    assert study["seeds"] == [0, 1]
    for kind in ("person", "vehicle"):
        arms = study["summary"][kind]
        assert set(arms) == set(denoiserep_study.ARMS)
        for entry in arms.values():
            assert 0.0 <= entry["mAP_clean"] <= 1.0 and 0.0 <= entry["mAP_corrupted"] <= 1.0
            assert math.isfinite(entry["mAP_clean_vs_A"]["half_width"])
        assert arms["A"]["mAP_clean_vs_A"] == {"mean": 0.0, "half_width": 0.0}


def test_the_arms_are_what_they_claim(study: dict) -> None:
    for kind in ("person", "vehicle"):
        arms = study["summary"][kind]
        # C and D sit at their optimum; E matches C's weight change with the wrong content.
        for arm in ("C", "D 2e-2", "D 2e-1"):
            assert arms[arm]["loss_gap_left"] == pytest.approx(0.0, abs=1e-6)
            assert arms[arm]["d_distance"] == pytest.approx(0.0, abs=1e-6)
        assert arms["E"]["weight_change"] == pytest.approx(arms["C"]["weight_change"], rel=1e-4)
        assert arms["E"]["loss_gap_left"] > 1.0
        # The strength knob: a larger beta_T, a larger fused change.
        changes = [arms[a]["weight_change"] for a in ("C", "D 2e-2", "D 2e-1")]
        assert changes == sorted(changes) and changes[0] < changes[-1]
        assert arms["A"]["weight_change"] == 0.0 and arms["B"]["weight_change"] > 0.0


def test_paired_interval_matches_a_hand_computation() -> None:
    result = denoiserep_study.paired([0.5, 0.7, 0.6], [0.4, 0.5, 0.6])
    # Differences 0.1, 0.2, 0.0: mean 0.1, sd 0.1, t(0.975, 2) = 4.303.
    assert result["mean"] == pytest.approx(0.1)
    assert result["half_width"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))


def test_the_recorded_full_run_has_five_paired_seeds() -> None:
    recorded = Path(__file__).resolve().parents[1] / "bench" / "results" / "denoiserep_study.json"
    figures = json.loads(recorded.read_text())["figures"]
    assert len(figures["seeds"]) >= 5
    assert set(figures["summary"]) == {"person", "vehicle"}
