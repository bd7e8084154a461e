"""The fusion benchmark runs end to end (--quick) and reports consistent figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fusion_benchmark_quick_run(tmp_path):
    out = tmp_path / "fusion.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    models = "vit_small_patch16_224,resnet50"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fusion",
            "--quick",
            "--device",
            "cpu",
            "--models",
            models,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| vit_small_patch16_224 | mlp" in completed.stdout  # the markdown table

    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "fusion"
    assert payload["machine"]["cpu"] and payload["machine"]["torch"]
    assert payload["figures"]["settings"]["quick"] is True
    results = {m["model"]: m for m in payload["figures"]["models"]}
    assert set(results) == set(models.split(","))
    for m in results.values():
        # Fusion is free: the fused model has exactly the baseline's parameters and arithmetic ...
        assert m["params"]["fused"] == m["params"]["baseline"] < m["params"]["unfused"]
        assert m["state_dict_bytes_fp32"]["fused"] == m["state_dict_bytes_fp32"]["baseline"]
        assert (
            m["macs_per_image"]["fused"] == m["macs_per_image"]["baseline"] < m["macs_per_image"]["unfused"]
        )
        # ... and computes what the unfused model computes.
        assert m["fused_vs_unfused_rel_err"] < 1e-5
        assert m["denoising_layers"] > 0
        for variant in ("baseline", "unfused", "fused"):
            assert m["images_per_s"][variant] > 0
        assert m["ratio_unfused_over_fused"] > 0 and m["ratio_fused_over_baseline"] > 0
