"""Bad input, table-driven: each case -> exit status 2 and one line naming the
setting or file and the fix, no traceback; plus the decoding cases that must
give a correct result or a named refusal."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxreid.data.datasets import DataError
from jaxreid.data.images import decode_image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SYNTHETIC = os.path.join(ROOT, "configs", "synthetic.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )


def _main(workdir: str, *overrides: str) -> subprocess.CompletedProcess:
    return _run("-m", "jaxreid.main", f"--config={SYNTHETIC}", f"--workdir={workdir}", *overrides)


# (id, overrides, words the one-line message must contain)
MAIN_CASES = [
    ("epochs-0", ["--config.train.epochs=0"], ["train.epochs = 0", ">= 1"]),
    ("epochs-negative", ["--config.train.epochs=-3"], ["train.epochs = -3"]),
    ("unknown-key", ["--config.foo=1"], ["unknown config key 'foo'", "--config.foo=1"]),
    ("wrong-type", ["--config.train.epochs=abc"], ["--config.train.epochs", "abc"]),
    (
        "unknown-method-and-backbone",
        ["--config.method.name=nope", "--config.model.backbone=vgg"],
        ["2 problems", "method.name = 'nope'", "model.backbone = 'vgg'", "osnet_x0_25"],
    ),
    (
        "batch-not-multiple-of-instances",
        ["--config.method.name=cluster_contrast", "--config.train.batch_size=30"],
        ["train.batch_size = 30", "train.num_instances"],
    ),
    (
        "camera-groups-not-multiple-of-instances",
        [
            "--config.method.name=cluster_contrast",
            "--config.train.camera_groups=True",
            "--config.train.batch_size=32",
            "--config.model.bn_group_size=8",
            "--config.train.num_instances=16",
        ],
        ["model.bn_group_size = 8", "train.num_instances = 16"],
    ),
    ("camera-groups-scl", ["--config.train.camera_groups=True"], ["SCL samples a plain shuffle"]),
    (
        "setting-of-another-method",
        ["--config.method.lam_t=0.3", "--config.method.name=hhcl"],
        ["method.lam_t: not a setting of method 'hhcl'", "instance_weight"],
    ),
    ("method-setting-value", ["--config.method.k=three"], ["--config.method.k=three"]),
    ("batch-0", ["--config.train.batch_size=0"], ["train.batch_size = 0"]),
    (
        "unknown-mixture-init",
        ["--config.method.mixture_init=ones"],
        ["method.mixture_init = 'ones'", "zeros, features"],
    ),
    ("negative-eps", ["--config.cluster.eps=-0.5"], ["cluster.eps = -0.5", "(0, 1]"]),
    ("min-samples-0", ["--config.cluster.min_samples=0"], ["cluster.min_samples = 0"]),
    (
        "negative-camera-affinity",
        ["--config.cluster.camera_affinity=-0.2"],
        ["cluster.camera_affinity = -0.2", "[0, inf)"],
    ),
    (
        "negative-eval-camera-affinity",
        ["--config.eval.camera_affinity=-0.2"],
        ["eval.camera_affinity = -0.2", "[0, inf)"],
    ),
    ("negative-final-eps", ["--config.cluster.final_eps=-0.3"], ["cluster.final_eps = -0.3"]),
    ("k1-inter-0", ["--config.cluster.k1_inter=0"], ["cluster.k1_inter = 0", "must be >= 1"]),
    ("ema-decay-1", ["--config.train.ema_decay=1.0"], ["train.ema_decay = 1.0", "[0, 1)"]),
    ("missing-pretrained", ["--config.model.pretrained=/no/such.pth"], ["/no/such.pth"]),
    ("missing-data-root", ["--config.data.root=/no/such/root"], ["/no/such/root"]),
    # NaN and inf are never a setting (NaN compared as 0 before).
    (
        "camera-affinity-nan",
        ["--config.cluster.camera_affinity=nan"],
        ["cluster.camera_affinity = nan", "finite"],
    ),
    (
        "eval-camera-affinity-inf",
        ["--config.eval.camera_affinity=inf"],
        ["eval.camera_affinity = inf"],
    ),
    ("eps-nan", ["--config.cluster.eps=nan"], ["cluster.eps = nan"]),
    ("ema-decay-nan", ["--config.train.ema_decay=nan"], ["train.ema_decay = nan"]),
    ("lr-nan", ["--config.optimizer.lr=nan"], ["optimizer.lr = nan", "finite"]),
    ("lr-0", ["--config.optimizer.lr=0"], ["optimizer.lr = 0", "(0, inf)"]),
    ("lr-negative", ["--config.optimizer.lr=-0.01"], ["optimizer.lr = -0.01", "(0, inf)"]),
    ("momentum-1", ["--config.optimizer.momentum=1.0"], ["optimizer.momentum = 1.0", "[0, 1)"]),
    ("momentum-negative", ["--config.optimizer.momentum=-0.1"], ["optimizer.momentum = -0.1"]),
    (
        "weight-decay-negative",
        ["--config.optimizer.weight_decay=-1e-4"],
        ["optimizer.weight_decay = -0.0001", "[0, inf)"],
    ),
    ("scl-temperature-nan", ["--config.method.temperature=nan"], ["method.temperature = nan"]),
    ("scl-lam-inf", ["--config.method.lam_c=inf"], ["method.lam_c = inf"]),
    (
        "cluster-temperature-0",
        ["--config.method.name=cluster_contrast", "--config.method.temperature=0"],
        ["method.temperature = 0", "(0, inf)"],
    ),
    (
        "cluster-momentum-nan",
        ["--config.method.name=hhcl", "--config.method.instance_momentum=nan"],
        ["method.instance_momentum = nan"],
    ),
    (
        "instance-nce-temperature-inf",
        ["--config.method.name=instance_nce", "--config.method.temperature=inf"],
        ["method.temperature = inf"],
    ),
    (
        "supervised-smoothing-nan",
        ["--config.method.name=supervised", "--config.method.label_smoothing=nan"],
        ["method.label_smoothing = nan"],
    ),
    # The config file itself (it replaces configs/synthetic.py).
    (
        "missing-config-file",
        ["--config=/no/such/config.py"],
        ["/no/such/config.py", "no such file"],
    ),
    (
        "config-argument-unknown",
        [f"--config={ROOT}/configs/cuhk03_uda.py:nosuch"],
        ["cuhk03_uda.py:nosuch", "unknown method 'nosuch'"],
    ),
]


@pytest.mark.parametrize("name, overrides, words", MAIN_CASES, ids=[c[0] for c in MAIN_CASES])
def test_main_rejects_bad_config_in_one_line(tmp_path, name, overrides, words):
    if name == "missing-data-root":  # synthetic data is generated; use a Market reader
        overrides = [*overrides, "--config.data.dataset=market1501"]
    if overrides[0].startswith("--config="):  # a config file of the case's own
        result = _run("-m", "jaxreid.main", *overrides, f"--workdir={tmp_path / 'w'}")
    else:
        result = _main(str(tmp_path / "w"), *overrides)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output
    for word in words:
        assert word in errors[0], (word, errors[0])


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_workdir_that_is_a_file(tmp_path, where):
    path = tmp_path / "taken"
    path.write_text("x")
    workdir = path if where == "is-a-file" else path / "sub"
    result = _main(str(workdir))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"--workdir {workdir}" in result.stderr and "existing file" in result.stderr


def _features(tmp_path, **replace) -> str:
    rng = np.random.default_rng(0)
    data = dict(
        query_features=rng.normal(size=(4, 8)).astype(np.float32),
        gallery_features=rng.normal(size=(6, 8)).astype(np.float32),
        query_pids=np.array([1, 2, 3, 4]),
        gallery_pids=np.array([1, 2, 3, 4, 5, 6]),
        query_cams=np.array([0, 0, 0, 0]),
        gallery_cams=np.array([1, 1, 1, 1, 1, 1]),
    )
    data.update(replace)
    path = str(tmp_path / "f.npz")
    np.savez(path, **data)
    return path


EVAL_CASES = [
    (
        "width-0",
        dict(query_features=np.zeros((4, 0), np.float32), gallery_features=np.zeros((6, 0))),
        "width 0",
    ),
    (
        "empty-query",
        dict(
            query_features=np.zeros((0, 8), np.float32),
            query_pids=np.zeros(0, int),
            query_cams=np.zeros(0, int),
        ),
        "no query rows",
    ),
    (
        "empty-gallery",
        dict(
            gallery_features=np.zeros((0, 8), np.float32),
            gallery_pids=np.zeros(0, int),
            gallery_cams=np.zeros(0, int),
        ),
        "no gallery rows",
    ),
    ("no-valid-query", dict(gallery_cams=np.zeros(6, int)), "no query has a match"),
    ("nan", dict(query_features=np.full((4, 8), np.nan, np.float32)), "NaN"),
]


def test_evaluate_cli_error_lines(tmp_path, capsys):
    from jaxreid.evaluate.cli import main

    for name, replace, words in EVAL_CASES:
        path = _features(tmp_path, **replace)
        assert main(["--features", path, "--json"]) == 2, name
        captured = capsys.readouterr()
        assert captured.out == "", name  # never a NaN in the JSON output
        assert captured.err.count("\n") == 1 and words in captured.err, (name, captured.err)
        assert path in captured.err


# ----------------------------------------------------------------- decoding


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 32 * 16).reshape(32, 16).astype(np.uint16)
    path = str(tmp_path / "deep.png")
    Image.fromarray(values).save(path)  # mode I;16
    assert Image.open(path).mode.startswith("I")
    pixels, converted = decode_image(path, 32, 16)
    assert converted
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(pixels[..., 0], expected)
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    assert pixels.min() == 0 and pixels.max() == 255  # not all white


def test_float_image_is_refused_by_name(tmp_path):
    path = str(tmp_path / "float.tiff")
    Image.fromarray(np.ones((8, 4), np.float32)).save(path)  # mode F
    with pytest.raises(DataError, match=r"float.tiff.*floating point"):
        decode_image(path, 8, 4)


def test_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch):
    path = str(tmp_path / "huge.png")
    Image.new("RGB", (64, 64)).save(path)
    # PIL raises DecompressionBombError above twice its pixel limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"huge.png.*decompression-bomb"):
        decode_image(path, 8, 4)
