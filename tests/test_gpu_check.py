"""benchmarks/gpu_check.sh runs on the CPU at CI sizes and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.sh")


def _run(tmp_path, *args: str) -> dict:
    out = tmp_path / "check.json"
    result = subprocess.run(
        ["bash", SCRIPT, "--small", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| part | figure |" in result.stdout  # the readable table
    return json.loads(out.read_text())


def test_gpu_check_selection_and_clustering_parts(tmp_path):
    results = _run(tmp_path, "--skip", "train,epoch")
    parts = results["parts"]
    assert set(parts) == {"selection", "cluster"}
    assert parts["selection"]["rows"] == 4000 and parts["selection"]["ms"] > 0
    clustered = parts["cluster"]["2000"]
    # the benchmark's features hold N/8 clusters plus unclustered points
    assert 20 <= clustered["clusters"] <= 400
    assert clustered["total_s"] > 0


@pytest.mark.slow
def test_gpu_check_every_part(tmp_path):
    parts = _run(tmp_path)["parts"]
    assert set(parts) == {"train", "epoch", "selection", "cluster"}
    for dtype in ("float32", "bfloat16"):
        assert parts["train"][dtype]["img_per_s"] > 0
    assert parts["epoch"]["scl_paper"]["steps"] == 8  # 64 images / batch 8
    assert parts["epoch"]["cluster_recipe"]["cluster_s"] > 0


def test_gpu_check_rejects_unknown_parts(tmp_path):
    result = subprocess.run(
        ["bash", SCRIPT, "--small", "--skip", "trian"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "unknown parts ['trian']" in result.stderr
