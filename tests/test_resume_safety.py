"""Nothing lost, nothing silently wrong (issue 45): a resume or an evaluation
never rewrites the run's config.json, a resume whose settings the checkpoint
cannot take is refused before anything changes on disk, a damaged checkpoint
is named (and an earlier one used only when asked), SIGINT during the initial
evaluation stops cleanly, and degenerate clusterings or neighbour sizes stop
with advice that works. Checked on the files on disk, not only the messages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
from helpers import ROOT, cluster_config, tiny_data, tiny_main_command

from jaxreid.config_base import base_config
from jaxreid.methods import TrainSet, get_method
from jaxreid.methods.cluster import ClusteringError, recluster
from jaxreid.train import TrainingInterrupted, train_and_evaluate
from jaxreid.utils import UserError

# 1 epoch x 3 steps, checkpoints at steps 2 and 3 (both kept), 128 x 64.
TINY = [
    "--config.data.height=128",
    "--config.data.width=64",
    "--config.train.epochs=1",
    "--config.train.steps_per_epoch=3",
    "--config.train.checkpoint_every_steps=2",
    "--config.train.keep_checkpoints=2",
    "--config.train.eval_every=1",
    "--config.eval.batch_size=32",
]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)


def _files(folder: str) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    out = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _error_line(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """A finished tiny SCL run: (its workdir, the command that made it)."""
    workdir = str(tmp_path_factory.mktemp("resume") / "run")
    command = [*tiny_main_command(tiny_root, workdir), *TINY]
    result = _run(command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "latest", "3"))
    return workdir, command


def _copy(trained, tmp_path) -> tuple[str, list[str]]:
    workdir, command = trained
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    return copy, [f"--workdir={copy}" if a.startswith("--workdir=") else a for a in command]


def test_refused_resume_changes_nothing_on_disk(trained, tmp_path):
    workdir, command = _copy(trained, tmp_path)
    before = _files(workdir)
    # Two settings the checkpoint cannot take, and one it can (more epochs).
    changed = [
        "--config.model.embed_dim=64",
        "--config.data.width=128",
        "--config.train.epochs=5",
    ]
    line = _error_line(_run([*command, *changed]))
    assert "2 changed settings" in line
    assert "model.embed_dim 32 -> 64" in line and "data.width 64 -> 128" in line
    assert "train.epochs" not in line and "another --workdir" in line
    after = _files(workdir)
    # log.txt may grow; every other file (config.json, checkpoints, results) is the same bytes.
    for files in (before, after):
        files.pop("log.txt", None)
    assert after == before


def test_eval_with_overrides_keeps_the_run_files(trained, tmp_path):
    workdir, command = _copy(trained, tmp_path)
    before = _files(workdir)
    result = _run([*command, "--mode=eval", "--config.eval.flip=True", "--config.seed=7"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    after = _files(workdir)
    assert after["config.json"] == before["config.json"]
    assert after["results.json"] == before["results.json"]
    assert "results_eval.json" in after and "results_eval.json" not in before
    assert json.loads(after["results_eval.json"])["config"]["eval"]["flip"] is True


def _damage(workdir: str, step: int) -> None:
    state = os.path.join(workdir, "checkpoints", "latest", str(step), "state")
    damaged = 0
    for parent, _, names in os.walk(state):
        for name in names:
            with open(os.path.join(parent, name), "wb") as f:
                f.write(b"not a checkpoint")
            damaged += 1
    assert damaged


def test_damaged_checkpoint_is_named_and_an_earlier_one_used_only_when_asked(trained, tmp_path):
    workdir, command = _copy(trained, tmp_path)
    _damage(workdir, 3)
    before = _files(workdir)
    line = _error_line(_run(command))
    assert "step 3" in line and "--config.train.resume_from=STEP" in line and "2" in line
    after = _files(workdir)
    for files in (before, after):
        files.pop("log.txt", None)
    assert after == before  # nothing moved, nothing rewritten

    # Asked for: step 2 restored, the damaged step 3 moved aside (not deleted),
    # the last step trained again; config.json untouched, the change logged.
    config_json = before["config.json"]
    result = _run([*command, "--config.train.resume_from=2"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "resumed from step 2 of 3" in output
    assert "train.resume_from 0 -> 2" in output  # the allowed change, logged
    unreadable = os.path.join(workdir, "checkpoints", "unreadable")
    assert "latest_3" in os.listdir(unreadable)
    assert os.listdir(os.path.join(unreadable, "latest_3"))  # its files kept
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "latest", "3"))  # saved anew
    with open(os.path.join(workdir, "config.json"), "rb") as f:
        assert f.read() == config_json


# ------------------------------------------------------------ in process


def test_sigint_during_the_initial_evaluation_stops_cleanly(tiny_root, tmp_path, monkeypatch):
    import jaxreid.train as train_module

    real = train_module.evaluate_model

    def interrupted_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in the middle of it
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_model", interrupted_evaluation)
    config = cluster_config(tiny_root, **{"cluster.eps": 0.45})
    handler = signal.getsignal(signal.SIGINT)
    workdir = str(tmp_path / "w")
    with pytest.raises(TrainingInterrupted, match="stopped at step 0"):
        train_and_evaluate(config, workdir, tiny_data(config), log=lambda s: None)
    assert signal.getsignal(signal.SIGINT) is handler
    # The initial evaluation is kept in a checkpoint at step 0: a resume skips it.
    meta_file = os.path.join(workdir, "checkpoints", "latest", "0", "meta", "metadata")
    with open(meta_file) as f:
        assert json.load(f)["initial"]["plain"]["mAP"] > 0


def _train_set(features: np.ndarray) -> TrainSet:
    n = len(features)
    return TrainSet(
        cameras=np.arange(n) % 3,
        identities=np.zeros(n, int),
        extract=lambda: {"global": features},
        output_shapes={"global": features.shape[1:]},
    )


def _groups(num_groups: int, size: int, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_groups, 16))
    points = np.repeat(centres, size, axis=0) + spread * rng.normal(size=(num_groups * size, 16))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_one_giant_cluster_stops_with_advice_that_works(tmp_path):
    # eps 1.0 joins everything: one cluster of all 48 images (loss 0 if trained on).
    config = cluster_config(str(tmp_path), **{"cluster.eps": 1.0, "train.batch_size": 4})
    features = _groups(12, 4, 0.05)
    with pytest.raises(ClusteringError) as error:
        recluster("cluster_contrast", config, _train_set(features), 0)
    message = str(error.value)
    assert "one cluster holds 48 images" in message and "Lower cluster.eps (now 1" in message
    assert "batch_size" not in message.split("nothing.")[1]  # no advice to shrink the batch
    # The advised eps gives a clustering that trains: 12 clusters of 4.
    config.cluster.eps = 0.5
    memory, labels, stats = recluster("cluster_contrast", config, _train_set(features), 0)
    assert stats["num_clusters"] == 12 and stats["largest_cluster"] == 4


def test_everything_an_outlier_stops(tmp_path):
    config = cluster_config(str(tmp_path), **{"cluster.eps": 0.01, "cluster.min_samples": 4})
    with pytest.raises(ClusteringError, match=r"every image is an outlier.*Raise cluster.eps"):
        recluster("cluster_contrast", config, _train_set(_groups(48, 1, 0.0)), 0)


def test_neighbour_sizes_above_the_training_set_are_refused(tmp_path):
    features = _groups(2, 4, 0.05)
    config = cluster_config(str(tmp_path), **{"cluster.k1": 8})
    method = get_method(config)
    with pytest.raises(UserError, match=r"cluster.k1 = 8: the training set has 8 images"):
        method.init_memory(_train_set(features))
    config = base_config()
    config.method.k = 7
    with pytest.raises(UserError, match=r"method.k = 7: the training set has 8 images"):
        get_method(config).init_memory(_train_set(features))


def test_resume_changes_split_breaking_from_allowed(tmp_path):
    from jaxreid.checkpoints import resume_changes

    stored = json.loads(base_config().to_json_best_effort())
    (tmp_path / "config.json").write_text(json.dumps(stored))
    allowed = json.loads(json.dumps(stored))
    allowed["train"]["epochs"] += 10
    allowed["optimizer"]["lr"] = 1e-4
    allowed["model"]["pretrained"] = "/elsewhere.pth"  # read only at initialisation
    allowed["train"]["new_key"] = 1  # a setting the stored run predates
    assert resume_changes(str(tmp_path), allowed) == [
        "model.pretrained '' -> '/elsewhere.pth'",
        "optimizer.lr 0.001 -> 0.0001",
        "train.epochs 50 -> 60",
        "train.new_key None -> 1",
    ]
    breaking = json.loads(json.dumps(stored))
    breaking["method"]["name"] = "hhcl"
    breaking["model"]["backbone"] = "resnet18"
    breaking["optimizer"]["name"] = "adam"
    breaking["train"]["ema_decay"] = 0.99
    with pytest.raises(UserError) as error:
        resume_changes(str(tmp_path), breaking)
    for word in ("4 changed settings", "method.name", "model.backbone", "optimizer.name"):
        assert word in str(error.value)
    assert "train.ema_decay 0.0 -> 0.99" in str(error.value)
    assert (tmp_path / "config.json").read_text() == json.dumps(stored)


def test_the_memory_comes_back_in_its_saved_shapes_and_nothing_else_does(tmp_path):
    import jax.numpy as jnp
    from flax import struct

    from jaxreid.checkpoints import Checkpoints

    class State(struct.PyTreeNode):
        step: jnp.ndarray
        params: dict
        memory: dict

    saved = State(
        step=jnp.int32(7),
        params={"w": jnp.arange(6.0).reshape(2, 3)},
        memory={"table": jnp.arange(12.0).reshape(4, 3).astype(jnp.bfloat16)},
    )

    def resume(template):
        checkpoints = Checkpoints(str(tmp_path))
        try:
            return checkpoints.resume(template)
        finally:
            checkpoints.close()

    checkpoints = Checkpoints(str(tmp_path))
    checkpoints.save(checkpoints.latest, saved, {"history": []})
    checkpoints.close()
    # A fresh process's template: the memory of another epoch (one float32 row).
    state, meta = resume(saved.replace(memory={"table": jnp.zeros((1, 3), jnp.float32)}))
    assert state.memory["table"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(state.memory["table"], saved.memory["table"])
    np.testing.assert_array_equal(state.params["w"], saved.params["w"])
    assert int(state.step) == 7 and meta == {"history": []}
    # Parameters of another shape are still refused, naming the checkpoint.
    with pytest.raises(UserError, match="cannot be restored"):
        resume(saved.replace(params={"w": jnp.zeros((3, 3))}))
