"""Two processes joined with jax.distributed on localhost (CPU collectives
through gloo) train one config together, each feeding its half of every
batch; the run gives the same bits as one process driving two devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
from helpers import step_losses, tiny_main_command


def _command(root: str, workdir: str, method: str) -> list[str]:
    args = [
        *tiny_main_command(root, workdir, method),
        "--config.model.bn_group_size=4",  # two groups: one per device
        "--config.optimizer.name=sgd",
        "--config.optimizer.lr=0.01",
        "--config.train.epochs=2",
        "--config.train.steps_per_epoch=3",
        "--config.train.eval_every=2",
        "--config.train.log_every=1",
    ]
    if method != "scl":
        args += [
            "--config.model.head=bnneck",
            "--config.method.temperature=0.05",
            "--config.train.num_instances=2",
            "--config.cluster.k1=10",
            "--config.cluster.k2=4",
            "--config.cluster.min_samples=2",
            "--config.cluster.eps=0.45",
        ]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# SCL across processes is the slow variant (2 min cold): the transport is
# method-agnostic, and SCL's device-count invariance has its own fast test
# (test_train.py::test_scl_same_bits_on_1_and_4_devices).
@pytest.mark.parametrize(
    "method", [pytest.param("scl", marks=pytest.mark.slow), "cluster_contrast"]
)
def test_two_processes_match_one_process_on_two_devices(tiny_root, tmp_path, method):
    single = str(tmp_path / "single")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(
        _command(tiny_root, single, method), env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    shared = str(tmp_path / "multi")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device each
    procs = [
        subprocess.Popen(
            [
                *_command(tiny_root, shared, method),
                "--multiprocess",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={rank}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    assert "[process 1]" in logs[1]
    assert "2 x cpu" in open(os.path.join(shared, "log.txt")).read()

    # The same bits: every step's loss and the final metrics.
    assert len(step_losses(single)) == 6
    assert step_losses(shared) == step_losses(single)
    with open(os.path.join(single, "results.json")) as f:
        one = json.load(f)["final"]
    with open(os.path.join(shared, "results.json")) as f:
        two = json.load(f)["final"]
    assert two == one
