"""Self-supervised person pre-training (#52): the losses against NumPy (value
and gradient), the ReID prior's behaviour, the collapse monitor, and the
pre-training loop: runs from its config, resumes with the same metrics,
keeps the teacher in its checkpoint and hands it to a clustering method."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreid import pretrain_losses as L
from jaxreid import reid_prior
from jaxreid.config_base import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------- losses


def test_distillation_loss_value_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    v, b, k = 3, 4, 7
    s = rng.normal(size=(v, b, k))
    t = rng.normal(size=(b, k))
    c = rng.normal(size=k) * 0.1
    ts, tt = 0.1, 0.04
    target = _softmax((t - c) / tt)
    log_p = np.log(_softmax(s / ts))
    want = -np.mean(np.sum(target[None] * log_p, axis=-1))
    # d/ds of the mean cross-entropy: (softmax(s / ts) - target) / ts / (V B).
    want_grad = (_softmax(s / ts) - target[None]) / ts / (v * b)
    f = lambda s_, t_: L.distillation_loss(s_, t_, jnp.asarray(c, jnp.float32), ts, tt)  # noqa: E731
    value, (grad_s, grad_t) = jax.value_and_grad(f, argnums=(0, 1))(
        jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    )
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_s), want_grad, rtol=1e-4, atol=1e-6)
    assert not np.any(np.asarray(grad_t))  # the teacher gets no gradient


def test_update_center_is_the_moving_average_of_the_batch_mean():
    rng = np.random.default_rng(1)
    c, t = rng.normal(size=5), rng.normal(size=(6, 5))
    got = L.update_center(jnp.asarray(c), jnp.asarray(t), 0.9)
    np.testing.assert_allclose(np.asarray(got), 0.9 * c + 0.1 * t.mean(0), rtol=1e-6)


def test_restoration_loss_value_and_gradient_match_numpy():
    rng = np.random.default_rng(2)
    b, n, ch, eps = 2, 5, 6, 1e-6
    a = rng.normal(size=(b, n, ch))
    t = rng.normal(size=(b, n, ch))
    w = rng.integers(0, 2, size=(b, n)).astype(float) + 0.25
    norm_a = np.sqrt((a * a).sum(-1, keepdims=True) + eps)
    norm_t = np.sqrt((t * t).sum(-1, keepdims=True) + eps)
    p, u = a / norm_a, t / norm_t
    cos = (p * u).sum(-1)
    want = (w * (1 - cos)).sum() / w.sum()
    # d(1 - cos)/da = -(u - (p . u) p) / |a|, weighted by w / sum(w).
    want_grad = -(u - cos[..., None] * p) / norm_a * (w / w.sum())[..., None]
    f = lambda a_, t_: L.restoration_loss(a_, t_, jnp.asarray(w, jnp.float32), eps)  # noqa: E731
    value, (grad_a, grad_t) = jax.value_and_grad(f, argnums=(0, 1))(
        jnp.asarray(a, jnp.float32), jnp.asarray(t, jnp.float32)
    )
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_a), want_grad, rtol=1e-4, atol=1e-6)
    assert not np.any(np.asarray(grad_t))
    # A perfect prediction (any scale) costs nothing.
    assert abs(float(L.restoration_loss(3.0 * jnp.asarray(t), jnp.asarray(t), w))) < 1e-6


def test_variance_loss_value_and_gradient_match_numpy():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(8, 5)) * np.array([0.2, 0.5, 2.0, 3.0, 0.9])
    gamma, eps = 1.0, 1e-4
    std = np.sqrt(z.var(0, ddof=1) + eps)
    want = np.maximum(gamma - std, 0).mean()
    active = (std < gamma).astype(float)
    want_grad = -active / z.shape[1] * (z - z.mean(0)) / ((z.shape[0] - 1) * std)
    value, grad = jax.value_and_grad(L.variance_loss)(jnp.asarray(z, jnp.float32), gamma, eps)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)
    # Dimensions already spread past gamma (columns 2 and 3) get no gradient.
    assert not np.any(np.asarray(grad)[:, 2:4])


def test_collapse_monitor_matches_numpy_and_sees_collapse():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(16, 8))
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(float(L.embedding_std(jnp.asarray(z))), u.std(0).mean(), rtol=1e-5)
    s = np.linalg.svd(u - u.mean(0), compute_uv=False)
    p = s / s.sum()
    want_rank = np.exp(-(p * np.log(p)).sum())
    np.testing.assert_allclose(float(L.effective_rank(jnp.asarray(z))), want_rank, rtol=1e-4)
    # Every image on one point: no spread, rank 1; two directions: rank 2.
    same = jnp.tile(jnp.asarray(z[:1]), (16, 1))
    assert float(L.embedding_std(same)) < 1e-6
    assert abs(float(L.effective_rank(same)) - 1.0) < 1e-5
    two = jnp.asarray(np.repeat(np.eye(8)[:2], 8, axis=0))
    assert abs(float(L.effective_rank(two)) - 1.0) < 1e-4  # centred: one axis apart
    three = jnp.asarray(np.repeat(np.eye(8)[:3], 6, axis=0))
    assert abs(float(L.effective_rank(three)) - 2.0) < 1e-4


# ---------------------------------------------------------------- the ReID prior


def _key(n):
    return jax.random.key(n)


def test_blur_matches_a_numpy_separable_gaussian_and_keeps_flat_images():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 255, size=(2, 12, 6, 3)).astype(np.float32)
    out = np.asarray(reid_prior.gaussian_blur(_key(0), jnp.asarray(x), (1.5, 1.5), 1.0))

    def matrix(n, sigma):  # truncated at 4 sigma = 6 taps, rows renormalised
        i = np.arange(n)
        m = np.exp(-((i[:, None] - i[None]) ** 2) / (2 * sigma**2))
        m = m * (np.abs(i[:, None] - i[None]) <= 6)
        return m / m.sum(1, keepdims=True)

    want = np.einsum("ij,bjwc->biwc", matrix(12, 1.5), x)
    want = np.einsum("vw,bhwc->bhvc", matrix(6, 1.5), want)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-3)
    flat = jnp.full((1, 12, 6, 3), 77.0)
    np.testing.assert_allclose(
        np.asarray(reid_prior.gaussian_blur(_key(1), flat, (0.5, 3.0), 1.0)), 77.0, rtol=1e-5
    )
    # prob 0: unchanged bits.
    same = reid_prior.gaussian_blur(_key(0), jnp.asarray(x), (1.5, 1.5), 0.0)
    np.testing.assert_array_equal(np.asarray(same), x)


def test_down_up_sample_removes_fine_detail_and_keeps_flat_images():
    h, w = 32, 16
    stripes = np.zeros((4, h, w, 3), np.float32)
    stripes[:, ::2] = 255.0  # one-pixel horizontal stripes: the finest detail
    out = np.asarray(reid_prior.down_up_sample(_key(0), jnp.asarray(stripes), (0.25,), 1.0))
    # Antialiased down-sampling by 4 averages the stripes away.
    assert np.abs(np.diff(out[:, 4:-4], axis=1)).max() < 0.1 * 255
    assert np.abs(np.diff(stripes, axis=1)).max() == 255
    flat = jnp.full((2, h, w, 3), 40.0)
    np.testing.assert_allclose(
        np.asarray(reid_prior.down_up_sample(_key(1), flat, (0.25, 0.5), 1.0)), 40.0, rtol=1e-5
    )
    untouched = reid_prior.down_up_sample(_key(0), jnp.asarray(stripes), (0.25,), 0.0)
    np.testing.assert_array_equal(np.asarray(untouched), stripes)


def test_horizontal_occluder_fills_one_full_width_band():
    x = jnp.asarray(np.random.default_rng(6).uniform(1, 254, (8, 40, 10, 3)), jnp.float32)
    fill = (0.0, 255.0, 0.0)
    out = np.asarray(reid_prior.horizontal_occluder(_key(2), x, (0.1, 0.3), 1.0, fill))
    for image, before in zip(out, np.asarray(x), strict=True):
        filled = np.all(image == np.asarray(fill), axis=-1)  # (H, W)
        rows = np.flatnonzero(filled.all(axis=1))
        assert 4 <= len(rows) <= 12  # 10-30% of 40 rows
        assert np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))  # one band
        assert not filled[~filled.all(axis=1)].any()  # nothing outside it
        kept = np.setdiff1d(np.arange(40), rows)
        np.testing.assert_array_equal(image[kept], before[kept])


def test_partial_views_are_the_upper_and_lower_body():
    x = np.zeros((2, 32, 16, 3), np.float32)
    x[:, :16, :, 0] = 200.0  # upper half red
    x[:, 16:, :, 2] = 200.0  # lower half blue
    keep = (0.5, 0.5)
    upper = np.asarray(reid_prior.partial_view(_key(3), jnp.asarray(x), False, keep, (16, 16)))
    lower = np.asarray(reid_prior.partial_view(_key(3), jnp.asarray(x), True, keep, (16, 16)))
    assert upper.shape == lower.shape == (2, 16, 16, 3)
    # Away from the cut (the antialiasing kernel's reach): only the one half.
    np.testing.assert_allclose(upper[:, :14, :, 0], 200.0, atol=1e-3)
    np.testing.assert_allclose(upper[:, :14, :, 2], 0.0, atol=1e-3)
    np.testing.assert_allclose(lower[:, 2:, :, 2], 200.0, atol=1e-3)
    np.testing.assert_allclose(lower[:, 2:, :, 0], 0.0, atol=1e-3)
    # A random fraction: the upper view of 0.75 of the height reaches the blue.
    wide = np.asarray(
        reid_prior.partial_view(_key(3), jnp.asarray(x), False, (0.75, 0.75), (24, 16))
    )
    assert wide[:, -4:, :, 2].mean() > 150 and wide[:, :8, :, 0].mean() > 199


def test_cell_mask_hides_whole_cells_at_the_ratio():
    cells, pixels = reid_prior.cell_mask(_key(4), 5, (8, 4), (128, 64), 0.3)
    cells, pixels = np.asarray(cells), np.asarray(pixels)
    assert cells.shape == (5, 32) and pixels.shape == (5, 128, 64)
    np.testing.assert_array_equal(cells.sum(1), round(0.3 * 32))
    # Each cell is a 16x16 block of pixels, hidden exactly when the cell is.
    blocks = pixels.reshape(5, 8, 16, 4, 16).transpose(0, 1, 3, 2, 4).reshape(5, 32, 256)
    np.testing.assert_array_equal(blocks.all(-1), cells > 0)
    np.testing.assert_array_equal(blocks.any(-1), cells > 0)
    assert len({tuple(c) for c in cells}) > 1  # images draw their own cells


def test_prior_draws_are_a_function_of_the_key():
    x = jnp.asarray(np.random.default_rng(7).uniform(0, 255, (4, 32, 16, 3)), jnp.float32)

    def prior(key):
        k = jax.random.split(key, 3)
        y = reid_prior.down_up_sample(k[0], x, (0.25, 0.5), 0.5)
        y = reid_prior.gaussian_blur(k[1], y, (0.5, 2.0), 0.5)
        return reid_prior.horizontal_occluder(k[2], y, (0.1, 0.3), 0.5, (0.0, 0.0, 0.0))

    a, b, c = prior(_key(9)), jax.jit(prior)(_key(9)), prior(_key(10))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-3)
    assert not np.allclose(np.asarray(a), np.asarray(c))


_VIEWS_SCRIPT = """
import numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxreid.config_base import load_config
from jaxreid.pretrain import student_views

config = load_config({config!r})
images = np.random.default_rng(0).integers(0, 256, (8, 128, 64, 3), dtype=np.uint8)
views = {{}}
for n in (1, 2, 4):
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
    step = jax.jit(lambda key, x: student_views(key, x, config, (8, 4)))
    views[n] = [np.asarray(v) for v in step(jax.random.key(3), sharded)]
print(all(np.array_equal(a, b) for n in (2, 4) for a, b in zip(views[1], views[n])))
"""


def test_views_are_the_same_bits_on_any_device_count():
    """The prior draws with the whole batch's shape from the step's key: a
    batch spread over 1, 2 or 4 (simulated) devices gets the same views."""
    import subprocess
    import sys

    from helpers import simulated_devices_env

    script = _VIEWS_SCRIPT.format(config=os.path.join(ROOT, "configs", "pretrain_lite0.py"))
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=simulated_devices_env(8),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


# ---------------------------------------------------------------- the loop


def _tiny_pretrain_config(folder: str, **overrides):
    """configs/pretrain_lite0.py on a folder of crops, with a small random
    ResNet-18 and small heads: a few fast steps."""
    config = load_config(os.path.join(ROOT, "configs", "pretrain_lite0.py"))
    config.data.root = folder
    config.data.cache_dir = ""
    config.model.backbone = "resnet18"
    config.model.pretrained = ""
    config.model.bn_group_size = 8
    config.pretrain.projector_hidden = 32
    config.pretrain.projector_bottleneck = 16
    config.pretrain.prototypes = 64
    config.pretrain.predictor_hidden = 32
    config.pretrain.decode_threads = 2
    config.optimizer.lr = 1e-3
    config.train.batch_size = 8
    config.train.epochs = 2
    config.train.steps_per_epoch = 3
    config.train.log_every = 1
    config.train.checkpoint_every_steps = 2
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _metrics(workdir: str) -> dict[int, dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if k != "images_per_s"} for r in rows}


def _restore(workdir: str) -> dict:
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest")) as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
    return restored["state"]


def _leaves(tree) -> dict[str, np.ndarray]:
    from jaxreid.checkpoints import _path_names

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_path_names(k)): np.asarray(v) for k, v in flat}


@pytest.fixture(scope="module")
def crops(tiny_root):
    """The tiny synthetic set's training crops as an unlabelled folder."""
    return os.path.join(tiny_root, "bounding_box_train")


@pytest.fixture(scope="module")
def straight_run(crops, tmp_path_factory):
    from jaxreid.pretrain import pretrain

    workdir = str(tmp_path_factory.mktemp("pretrain_straight"))
    results = pretrain(_tiny_pretrain_config(crops), workdir, lambda _: None)
    return workdir, results


def test_config_files_validate():
    from jaxreid.pretrain import pretrain_problems
    from jaxreid.validate import config_problems

    for name in ("pretrain_lite0.py", "pretrain_vit.py", "luperson_pretrain.py"):
        config = load_config(os.path.join(ROOT, "configs", name))
        assert config.mode == "pretrain"
        problems = config_problems(config, "pretrain") + pretrain_problems(config)
        if name == "luperson_pretrain.py":  # its root is the user's LUPerson folder
            assert problems == [
                "data.root is empty: set it to the crops' folder (several: joined by ':')"
            ]
        else:
            assert problems == [], name


def test_bad_settings_are_named():
    from jaxreid.pretrain import pretrain_problems

    config = load_config(os.path.join(ROOT, "configs", "pretrain_lite0.py"))
    config.pretrain.teacher_momentum = 1.5
    config.pretrain.partial_keep = (0.7, 0.4)
    config.model.head = "fusion"
    text = "; ".join(pretrain_problems(config))
    assert "pretrain.teacher_momentum = 1.5" in text
    assert "pretrain.partial_keep = (0.7, 0.4)" in text
    assert "model.head = 'fusion'" in text


def test_pretraining_learns_and_keeps_the_teacher_in_its_checkpoint(straight_run):
    workdir, results = straight_run
    metrics = _metrics(workdir)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6] and results["steps"] == 6
    for row in metrics.values():
        assert np.isfinite(row["loss"]) and row["teacher_rank"] > 1.0
        assert 0 < row["teacher_std"] < 1
    # The predictor learns the teacher's cells within a few steps.
    assert metrics[6]["restore"] < metrics[1]["restore"]
    state = _restore(workdir)
    assert {"params", "batch_stats", "ema", "heads", "ema_projector", "center"} <= set(state)
    assert set(state["heads"]) == {"projector", "predictor"}
    student, teacher = _leaves(state["params"]), _leaves(state["ema"]["params"])
    assert student.keys() == teacher.keys()
    moved = [
        k
        for k in student
        if k.startswith("backbone") and not np.array_equal(student[k], teacher[k])
    ]
    assert moved  # the teacher follows the student, it is not a copy
    # The head (BN neck, GeM) stays as built: no gradient, no weight decay.
    from flax import nnx

    from jaxreid import models

    config = _tiny_pretrain_config("unused")
    _, init_params, _ = models.split_model(models.build_model(config.model, rngs=nnx.Rngs(0)))
    for name, value in _leaves(init_params).items():
        if name.startswith("head"):
            np.testing.assert_array_equal(student[name], value)


def test_pretraining_resumes_with_the_same_metrics(crops, straight_run, tmp_path):
    from jaxreid.pretrain import pretrain
    from jaxreid.run_io import TrainingInterrupted

    workdir = str(tmp_path)
    with pytest.raises(TrainingInterrupted):
        pretrain(_tiny_pretrain_config(crops, **{"train.stop_after_steps": 4}), workdir, print)
    assert sorted(_metrics(workdir)) == [1, 2, 3, 4]
    pretrain(_tiny_pretrain_config(crops), workdir, print)
    assert _metrics(workdir) == _metrics(straight_run[0])
    a, b = _leaves(_restore(workdir)), _leaves(_restore(straight_run[0]))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_the_workdir_starts_a_clustering_method_with_the_teacher(straight_run, tiny_root):
    from flax import nnx

    from jaxreid import models
    from jaxreid.validate import config_problems

    workdir, _ = straight_run
    config = load_config(os.path.join(ROOT, "configs", "cuhk03_cc.py"))
    tiny = _tiny_pretrain_config("unused")
    config.data.dataset, config.data.root = "market_layout", tiny_root
    config.model = tiny.model
    config.model.pretrained = workdir
    assert config_problems(config, "train") == []
    model = models.build_model(config.model, rngs=nnx.Rngs(5))
    _, params, batch_stats = models.split_model(model)
    teacher = _restore(workdir)["ema"]
    got = {**_leaves(params), **_leaves(batch_stats)}
    want = {**_leaves(teacher["params"]), **_leaves(teacher["batch_stats"])}
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ---------------------------------------------------------------- LUPerson's release


def _write_luperson(base: str, crops: str, count: int) -> list[str]:
    """LUPerson's release layout under `base` (lup/lmdb_300_30/{lmdb, keys.pkl})
    holding the first `count` crops' JPEG bytes; returns the files in key order."""
    import pickle

    lmdb = pytest.importorskip("lmdb")
    files = sorted(os.listdir(crops))[:count]
    folder = os.path.join(base, "lup", "lmdb_300_30")
    os.makedirs(folder)
    keys = [f"video_{i:03d}/{name}" for i, name in enumerate(files)]
    with lmdb.open(os.path.join(folder, "lmdb"), map_size=1 << 26) as env:
        with env.begin(write=True) as txn:
            for key, name in zip(keys, files, strict=True):
                with open(os.path.join(crops, name), "rb") as f:
                    txn.put(key.encode(), f.read())
    with open(os.path.join(folder, "keys.pkl"), "wb") as f:
        pickle.dump({"keys": keys, "pids": np.arange(len(keys))}, f)
    return [os.path.join(crops, name) for name in files]


def test_luperson_release_is_read_from_its_database(crops, tmp_path):
    import pickle

    from jaxreid.data.datasets import DataError, load_dataset
    from jaxreid.data.images import decode_image

    files = _write_luperson(str(tmp_path), crops, 5)
    # The root may be the folder above lup/, lup/ or the database's own folder.
    for root in (tmp_path, tmp_path / "lup", tmp_path / "lup" / "lmdb_300_30"):
        dataset = load_dataset("luperson", str(root))
        assert len(dataset.train) == 5 and not dataset.query and not dataset.gallery
        assert {r.pid for r in dataset.train} == {-1}  # the tracklet ids are not read
    for record, path in zip(dataset.train, files, strict=True):
        got, _ = decode_image(record.path, 32, 16)
        np.testing.assert_array_equal(got, decode_image(path, 32, 16)[0])
    with pytest.raises(DataError, match="does not exist"):
        decode_image(dataset.train[0].path + "_missing", 32, 16)
    # A keys.pkl that names anything but plain data is refused, not run.
    with open(tmp_path / "lup" / "lmdb_300_30" / "keys.pkl", "wb") as f:
        pickle.dump({"keys": [os.getcwd]}, f)
    with pytest.raises(DataError, match="not a LUPerson key list"):
        load_dataset("luperson", str(tmp_path))
    with pytest.raises(DataError, match="keys.pkl"):
        load_dataset("luperson", crops)


def test_pretraining_reads_luperson_and_other_modes_refuse_it(crops, tmp_path):
    from jaxreid.pretrain import pretrain
    from jaxreid.validate import config_problems

    _write_luperson(str(tmp_path / "data"), crops, 16)
    config = _tiny_pretrain_config(
        str(tmp_path / "data"), **{"data.dataset": "luperson", "train.epochs": 1}
    )
    results = pretrain(config, str(tmp_path / "run"), lambda _: None)
    assert results["steps"] == 3 and results["images"] == 16 and results["bad_images"] == 0
    assert all(np.isfinite(row["loss"]) for row in _metrics(str(tmp_path / "run")).values())
    config.mode = "train"
    assert any("data.dataset = 'luperson'" in p for p in config_problems(config, "train"))
