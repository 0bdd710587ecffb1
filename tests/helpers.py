"""Helpers shared by the test modules (and benchmarks/quality_seeds.py): the
tiny training configs and data, the `python -m jaxreid.main` command lines,
the per-step losses of a run, runs on simulated devices, the dense
k-reciprocal references and `unit`."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from jaxreid.config_base import base_config
from jaxreid.data import load_dataset
from jaxreid.data.images import decode_split
from jaxreid.methods import set_method
from jaxreid.train import Data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unit(x, axis=-1, dtype=None):
    """x / ||x|| along `axis`, in x's dtype (or `dtype`)."""
    x = np.asarray(x, dtype)
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def eval_arrays(seed=0, with_stripes=True) -> dict[str, np.ndarray]:
    """The arrays of a small valid `python -m jaxreid.evaluate` file: 6 queries
    (camera 0) and 18 gallery rows (3 cameras per identity), 8-d features
    near their identity's centre, stripes (N, 2, 4) of unit rows."""
    rng = np.random.default_rng(seed)
    num_ids, per_id = 6, 3
    gallery_pids = np.repeat(np.arange(1, num_ids + 1), per_id)
    gallery_cams = np.tile(np.arange(per_id), num_ids)
    query_pids = np.arange(1, num_ids + 1)
    query_cams = np.zeros(num_ids, np.int64)
    centres = rng.normal(size=(num_ids + 1, 8))
    qf = centres[query_pids] + 0.3 * rng.normal(size=(len(query_pids), 8))
    gf = centres[gallery_pids] + 0.3 * rng.normal(size=(len(gallery_pids), 8))
    arrays = dict(
        query_features=qf.astype(np.float32),
        gallery_features=gf.astype(np.float32),
        query_pids=query_pids,
        gallery_pids=gallery_pids,
        query_cams=query_cams,
        gallery_cams=gallery_cams,
    )
    if with_stripes:
        arrays["query_stripes"] = unit(qf.reshape(-1, 2, 4), dtype=np.float32)
        arrays["gallery_stripes"] = unit(gf.reshape(-1, 2, 4), dtype=np.float32)
    return arrays


def main_command(workdir: str, *flags: str) -> list[str]:
    """`python -m jaxreid.main` on configs/synthetic.py with extra flags."""
    config = f"--config={os.path.join(ROOT, 'configs', 'synthetic.py')}"
    return [sys.executable, "-m", "jaxreid.main", config, f"--workdir={workdir}", *flags]


def tiny_main_command(root: str, workdir: str, method: str = "scl") -> list[str]:
    """`python -m jaxreid.main` on the tiny set with the model of tiny_config,
    training `method` (SCL: with tiny_config's k and n; another method: its
    declared settings)."""
    method_flags = (
        ["--config.method.k=2", "--config.method.n=8"]
        if method == "scl"
        else [f"--config.method.name={method}"]
    )
    return main_command(
        workdir,
        "--config.data.dataset=market_layout",
        f"--config.data.root={root}",
        "--config.data.cache_dir=",
        "--config.model.backbone=resnet18",
        "--config.model.pretrained=",
        "--config.model.embed_dim=32",
        "--config.model.num_stripes=2",
        "--config.model.bn_group_size=8",
        *method_flags,
        "--config.train.batch_size=8",
    )


def tiny_config(root: str, **overrides):
    """The tiny training run of the loop tests; `overrides` are dotted keys.
    SCL with small k and n, or the method of a "method.name" override with
    its declared settings (the other "method." overrides over them)."""
    c = base_config()
    c.data.dataset = "market_layout"
    c.data.root = root
    # 128x64: XLA's CPU convolutions are very slow on the tiny last-stage
    # maps that 64x32 inputs give.
    c.data.height, c.data.width = 128, 64
    c.data.cache_dir = ""
    c.model.backbone = "resnet18"
    c.model.embed_dim = 32
    c.model.num_stripes = 2
    c.model.bn_group_size = 8
    method = overrides.pop("method.name", "scl")
    if method == "scl":
        c.method.k, c.method.n = 2, 8
        c.method.warmup_epochs = 1
        c.method.selection_block = 16
    else:
        set_method(c, method)
    c.optimizer.name = "adam"
    c.optimizer.lr = 3e-4
    c.train.batch_size = 8
    c.train.epochs = 2
    c.train.steps_per_epoch = 3
    c.train.eval_every = 1
    c.train.log_every = 1
    c.train.checkpoint_every_steps = 2
    c.eval.batch_size = 32
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return c


def random_embedder(backbone: str = "resnet18", head: str = "scl", pooling: str = "avg"):
    """An Embedder of a randomly initialised model at 64x32 (no training): the
    export and Embedder input tests."""
    from flax import nnx

    from jaxreid import models
    from jaxreid.inference import Embedder

    config = base_config()
    config.data.height, config.data.width = 64, 32
    config.model.backbone, config.model.head, config.model.pretrained = backbone, head, ""
    config.model.embed_dim = {"scl": 32, "fc": 512}.get(head, 0)
    config.model.num_stripes = 2
    config.model.pooling = pooling
    if backbone.startswith("vit_"):
        config.model.image_size = (64, 32)  # the position embeddings' grid
    model = models.build_model(config.model, rngs=nnx.Rngs(0))
    return Embedder(config, *models.split_model(model))


def link_tree(tiny_root, tmp_path) -> tuple[str, list[str]]:
    """A dataset built from links, as a user links the cameras of several
    disks into one tree: crops/camA -> disk1/cam1, crops/camB -> disk2/cam2
    (one level down, through a linked day folder), a loop disk1/cam1/back ->
    disk1 (a cycle), a second link crops/again -> disk1/cam1 and a broken link.
    Returns the root and the image names, each once."""
    source = os.path.join(tiny_root, "bounding_box_train")
    names = sorted(os.listdir(source))[:6]
    disk1, disk2 = tmp_path / "disk1" / "cam1", tmp_path / "disk2" / "cam2" / "day"
    for folder, part in ((disk1, names[:3]), (disk2, names[3:])):
        folder.mkdir(parents=True)
        for name in part:
            shutil.copy(os.path.join(source, name), folder / name)
    root = tmp_path / "crops"
    (root / "camB").mkdir(parents=True)
    (root / "camA").symlink_to(disk1, target_is_directory=True)
    (root / "camB" / "day").symlink_to(disk2, target_is_directory=True)
    (disk1 / "back").symlink_to(tmp_path / "disk1", target_is_directory=True)
    (root / "again").symlink_to(disk1, target_is_directory=True)
    (root / "camB" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    return str(root), names


def tiny_data(config) -> Data:
    dataset = load_dataset(config.data.dataset, config.data.root)
    splits = {
        s: decode_split(dataset.split(s), config.data.height, config.data.width, desc=s)
        for s in ("train", "query", "gallery")
    }
    return Data(**splits)


def step_losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    by_step = {r["step"]: r["loss"] for r in rows if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


_DEVICE_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from jaxreid.host import configure_host
configure_host()
from helpers import tiny_config, tiny_data
from jaxreid.train import TrainingInterrupted, train_and_evaluate
config = tiny_config({root!r}, **{overrides!r})
# With train.stop_after_steps, the run stops and resumes until it is done.
for attempt in range(100):
    try:
        result = train_and_evaluate(config, {workdir!r}, tiny_data(config), log=lambda s: None)
        break
    except TrainingInterrupted:
        continue
print(json.dumps({{"final": result["final"], "attempts": attempt + 1}}))
"""


# Batch-norm groups of 2: 4 (SCL) or 8 (cluster contrast) groups to share out.
DEVICE_RUN = {
    "train.epochs": 2,
    "train.steps_per_epoch": 3,
    "model.bn_group_size": 2,
    "optimizer.name": "sgd",
    "optimizer.lr": 1e-2,
}


# XLA:CPU aborts a collective whose device threads do not all arrive within
# 40 s; 8 simulated devices on 2 loaded cores can miss that (the CI run of
# 2026-12-07 did), so the device runs allow 10 minutes.
_COLLECTIVE_TIMEOUTS = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=600",
    "--xla_cpu_collective_timeout_seconds=600",
)


@functools.cache
def _collective_timeout_flags() -> tuple[str, ...]:
    """_COLLECTIVE_TIMEOUTS where this jaxlib knows them (XLA exits on an
    unknown flag), else none."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        env=dict(os.environ, XLA_FLAGS=" ".join(_COLLECTIVE_TIMEOUTS)),
        capture_output=True,
        timeout=300,
    )
    return _COLLECTIVE_TIMEOUTS if probe.returncode == 0 else ()


def simulated_devices_env(count: int = 8) -> dict[str, str]:
    """os.environ with XLA:CPU simulating `count` devices, collectives allowed
    10 minutes."""
    flags = [f"--xla_force_host_platform_device_count={count}", *_collective_timeout_flags()]
    return dict(os.environ, XLA_FLAGS=" ".join(flags))


def run_on_devices(count: int, root: str, workdir: str, overrides=DEVICE_RUN) -> dict:
    """Trains on the first `count` of 8 simulated CPU devices. The process
    always simulates 8: XLA:CPU sizes its thread pool by max(cores, devices)
    and splits kernels by it at compile time, so `--xla_force_host_platform_
    device_count=N` alone changes the kernels, not only the device count."""
    env = simulated_devices_env(8)
    script = _DEVICE_SCRIPT.format(
        tests=os.path.join(ROOT, "tests"),
        root=root,
        workdir=workdir,
        overrides={**overrides, "train.num_devices": count},
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# Small sets: k-reciprocal sizes and min_samples scaled down with them.
CLUSTER = {"cluster.k1": 10, "cluster.k2": 4, "cluster.min_samples": 2}


def cluster_config(root, method="cluster_contrast", **overrides):
    """tiny_config with a method of the clustering family (or the supervised
    reference) on the small set, at the family's temperature 0.05."""
    method_settings = {"method.temperature": 0.05} if method != "supervised" else {}
    return tiny_config(
        root,
        **{
            "model.head": "bnneck",
            "model.pooling": "gem",
            "model.embed_dim": 32,
            "method.name": method,
            **method_settings,
            "train.num_instances": 2,
            **CLUSTER,
            **overrides,
        },
    )


def train_on_learning_set(tmp_path, method: str, log=print, **overrides) -> tuple[dict, str]:
    """A short training of `method` (test_cluster_training's LEARN budget and
    `overrides`) on its learning set, generated under `tmp_path`: the results
    and the workdir (tmp_path / "w")."""
    from test_cluster_training import LEARN, LEARN_SET

    from jaxreid.data import synthetic
    from jaxreid.train import train_and_evaluate

    root = str(tmp_path / "synthetic")
    synthetic.generate(root, **LEARN_SET)
    config = cluster_config(root, method, **{**LEARN, **overrides})
    workdir = str(tmp_path / "w")
    return train_and_evaluate(config, workdir, tiny_data(config), log=log), workdir


# Dense k-reciprocal references (test_kreciprocal, test_camera_affinity).
def dense_rank(distance: np.ndarray) -> np.ndarray:
    """Neighbour order of every row: itself first, then by distance, ties by index."""
    d = distance.copy()
    np.fill_diagonal(d, -np.inf)
    return np.argsort(d, axis=1, kind="stable")


def _reciprocal(rank: np.ndarray, i: int, size: int) -> np.ndarray:
    forward = rank[i, :size]
    return np.array([j for j in forward if i in rank[j, :size]], dtype=np.int64)


def dense_encoding(distance, rank, k_forward, k_half, k2):
    n = len(distance)
    v = np.zeros((n, n))
    for i in range(n):
        r_i = _reciprocal(rank, i, k_forward)
        members = set(r_i.tolist())
        for c in r_i:
            r_c = _reciprocal(rank, c, k_half)
            if len(set(r_c.tolist()) & set(r_i.tolist())) > 2 / 3 * len(r_c):
                members |= set(r_c.tolist())
        e = np.array(sorted(members))
        w = np.exp(-distance[i, e])
        v[i, e] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    return v


def dense_jaccard(v_rows, v_all):
    mins = np.minimum(v_rows[:, None, :], v_all[None, :, :]).sum(-1)
    maxs = np.maximum(v_rows[:, None, :], v_all[None, :, :]).sum(-1)
    return 1.0 - mins / maxs
