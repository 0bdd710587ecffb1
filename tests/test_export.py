"""ONNX export, per backbone at tiny sizes: onnxruntime's features equal
jaxreid's on 16 images (max abs diff <= 1e-4), and the graph is no larger
than PyTorch's export of the same network: one Conv per convolution, batch
norm folded in, standard pooling (a regression to the CPU training kernels'
tap sums multiplies the node count). The command line's --int8 writes a
smaller file of close features. Skipped without jax2onnx / onnxruntime
(pip install "jaxreid[export]")."""

from __future__ import annotations

import collections
import os
import sys

import numpy as np
import pytest
from helpers import random_embedder

pytest.importorskip("jax2onnx", reason="ONNX export needs jax2onnx")
ort = pytest.importorskip("onnxruntime", reason="the export check needs onnxruntime")
onnx = pytest.importorskip("onnx", reason="the graph check reads the file with onnx")

CASES = {
    "resnet18-scl": ("resnet18", "scl", "avg"),
    # GeM pooling (the cluster recipe's): a trainable exponent in the graph.
    "resnet18-bnneck-gem": ("resnet18", "bnneck", "gem"),
    "resnet50-bnneck": ("resnet50", "bnneck", "avg"),
    "efficientnet_lite0-bnneck": ("efficientnet_lite0", "bnneck", "avg"),
    "osnet_x0_25-fc": ("osnet_x0_25", "fc", "avg"),
    # All 12 blocks of ViT-Ti (a 4 x 2 patch grid at 64x32), the [CLS] token.
    "vit_tiny-bnneck-cls": ("vit_tiny", "bnneck", "cls"),
}
# Operator nodes (all but Constant / Identity, which only the TorchScript
# exporter emits) of torch.onnx.export (torch 2.13, dynamo=False) of the
# same network: benchmarks/torch_reference.py's transcription (OSNet:
# tests/torch_osnet.py) with the case's head, its L2 norm and the input
# normalisation inside, at 64x32. test_torch_operator_counts_are_current
# recounts them where torch is installed.
TORCH_OPERATORS = {
    "resnet50-bnneck": 128,
    "efficientnet_lite0-bnneck": 100,
    "osnet_x0_25-fc": 397,
    "vit_tiny-bnneck-cls": 725,
}
# jaxreid's graph may have a few more nodes: transposes between its NHWC
# layout and ONNX's NCHW convolutions, the max pool's explicit -inf padding,
# the L2 norm written out. A convolution as tap sums adds ~20 nodes, an
# unfolded batch norm 2.
TORCH_SLACK = 1.15
NON_OPERATORS = ("Constant", "Identity")
IMAGES = np.random.default_rng(0).integers(0, 256, (16, 64, 32, 3), dtype=np.uint8)


def operator_count(path: str) -> int:
    model = onnx.load(path)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    return sum(n for op, n in ops.items() if op not in NON_OPERATORS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (embedder, ONNX path, output names), each exported once."""
    from jaxreid.export import export_onnx

    done = {}

    def export(case: str):
        if case not in done:
            embedder = random_embedder(*CASES[case])
            path = str(tmp_path_factory.mktemp("onnx") / f"{case}.onnx")
            done[case] = embedder, path, export_onnx(embedder, path)
        return done[case]

    return export


@pytest.mark.parametrize("case", CASES)
def test_onnx_features_equal_jaxreid(case, exported):
    embedder, path, names = exported(case)
    session = ort.InferenceSession(path)
    got = dict(zip(names, session.run(names, {"images": IMAGES.astype(np.float32)}), strict=True))
    want = embedder.embed(IMAGES)
    assert names == (["global", "stripes"] if CASES[case][1] == "scl" else ["global"])
    for name in names:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4)
    # Any batch size: one image.
    one = session.run(["global"], {"images": IMAGES[:1].astype(np.float32)})[0]
    np.testing.assert_allclose(one, want["global"][:1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", TORCH_OPERATORS)
def test_onnx_graph_is_no_larger_than_pytorchs(case, exported):
    _, path, _ = exported(case)
    ops = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    assert operator_count(path) <= TORCH_SLACK * TORCH_OPERATORS[case], ops
    if case.startswith("vit_"):
        # 2 LayerNormalization a block and the final one, attention as two
        # MatMul around one Softmax, 4 linear layers a block as MatMul + Add,
        # the patch embedding one Conv; nothing written out.
        assert (ops["LayerNormalization"], ops["Softmax"], ops["MatMul"]) == (25, 12, 72), ops
        assert ops["Conv"] == 1, ops
        assert not ops.keys() & {"ReduceMean", "Gemm", "Einsum", "Erf", "Pow"}, ops
        return
    convolutions = {
        "resnet50-bnneck": 53,
        "efficientnet_lite0-bnneck": 49,
        "osnet_x0_25-fc": 139 + 48,  # and the channel gates' two 1x1 convolutions
    }[case]
    assert ops["Conv"] == convolutions, ops  # one each, depthwise ones grouped
    assert not ops.keys() & {"BatchNormalization", "Einsum", "Concat", "Slice", "Pad"}, ops


def test_torch_operator_counts_are_current(tmp_path):
    pytest.importorskip("torch", reason="the PyTorch reference counts need torch")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from export_compare import export_torch, torch_deploy_model

    counts = {}
    for case in TORCH_OPERATORS:
        embedder = random_embedder(*CASES[case])
        path = str(tmp_path / f"{case}.onnx")
        export_torch(torch_deploy_model(embedder), path, embedder.height, embedder.width)
        counts[case] = operator_count(path)
    assert counts == TORCH_OPERATORS


def test_export_command_int8_writes_a_smaller_file_of_close_features(run_dir, tmp_path):
    from jaxreid import export
    from jaxreid.inference import Embedder

    paths = {kind: str(tmp_path / f"{kind}.onnx") for kind in ("float32", "int8")}
    assert export.main(["--workdir", run_dir, "--out", paths["float32"]]) == 0
    assert export.main(["--workdir", run_dir, "--out", paths["int8"], "--int8"]) == 0
    assert os.path.getsize(paths["int8"]) < 0.5 * os.path.getsize(paths["float32"])
    embedder = Embedder.from_workdir(run_dir)
    shape = (16, embedder.height, embedder.width, 3)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    want = embedder.embed(pixels)["global"]
    got = {
        kind: ort.InferenceSession(path).run(["global"], {"images": pixels.astype(np.float32)})[0]
        for kind, path in paths.items()
    }
    np.testing.assert_allclose(got["float32"], want, rtol=0, atol=1e-4)
    cosine = np.sum(got["int8"] * want, axis=1)  # both unit length
    assert cosine.min() > 0.98, cosine
    assert np.abs(got["int8"] - want).max() > 1e-6  # quantised, not the float graph


def test_subnormal_weights_are_flushed_to_zero():
    from onnx import TensorProto, helper, numpy_helper

    from jaxreid.export import flush_subnormals

    weights = np.array([1e-40, 1.0, 0.0, -2e-41, 1e-37], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.arange(3), "i")],
    )
    model = helper.make_model(graph)
    assert flush_subnormals(model) == 2
    flushed = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(flushed, np.array([0.0, 1.0, 0.0, 0.0, 1e-37], np.float32))
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[1]), np.arange(3))
