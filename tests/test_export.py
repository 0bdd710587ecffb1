"""ONNX export: onnxruntime's features equal jaxreid's on 16 images (max abs
diff <= 1e-4), for each backbone at tiny sizes; skipped without jax2onnx /
onnxruntime (pip install jax2onnx onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_embedder

pytest.importorskip("jax2onnx", reason="ONNX export needs jax2onnx")
ort = pytest.importorskip("onnxruntime", reason="the export check needs onnxruntime")

CASES = {
    "resnet18-scl": ("resnet18", "scl", "avg"),
    # GeM pooling (the cluster recipe's): a trainable exponent in the graph.
    "resnet18-bnneck-gem": ("resnet18", "bnneck", "gem"),
    "efficientnet_lite0-bnneck": ("efficientnet_lite0", "bnneck", "avg"),
    "osnet_x0_25-fc": ("osnet_x0_25", "fc", "avg"),
}
SLOW = {"efficientnet_lite0-bnneck", "osnet_x0_25-fc"}  # minutes on 2 cores


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES],
)
def test_onnx_features_equal_jaxreid(case, tmp_path):
    from jaxreid.export import export_onnx

    embedder = random_embedder(*CASES[case])
    path = str(tmp_path / "model.onnx")
    names = export_onnx(embedder, path)
    images = np.random.default_rng(0).integers(0, 256, (16, 64, 32, 3), dtype=np.uint8)
    session = ort.InferenceSession(path)
    got = dict(zip(names, session.run(names, {"images": images.astype(np.float32)}), strict=True))
    want = embedder.embed(images)
    assert names == (["global", "stripes"] if CASES[case][1] == "scl" else ["global"])
    for name in names:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4)
    # Any batch size: one image.
    one = session.run(["global"], {"images": images[:1].astype(np.float32)})[0]
    np.testing.assert_allclose(one, want["global"][:1], rtol=0, atol=1e-4)
