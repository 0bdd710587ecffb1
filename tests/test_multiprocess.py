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
    # "hhcl_sharded": hhcl with its instance bank in 2 row chunks, one per
    # device (method.instance_shards): each process holds half of the bank.
    sharded = method == "hhcl_sharded"
    method = "hhcl" if sharded else method
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
    if sharded:
        args.append("--config.method.instance_shards=2")
    return args


def _final_metrics(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)["final"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# SCL across processes is the slow variant (2 min cold): the transport is
# method-agnostic, and SCL's device-count invariance has its own fast test
# (test_train.py::test_scl_same_bits_on_1_and_4_devices). So is hhcl with a
# sharded bank (its fast variant: test_train.py::test_hhcl_with_a_sharded_
# instance_bank_same_bits_on_1_and_4_devices_and_resumed).
@pytest.mark.parametrize(
    "method",
    [
        pytest.param("scl", marks=pytest.mark.slow),
        "cluster_contrast",
        pytest.param("hhcl_sharded", marks=pytest.mark.slow),
    ],
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
    assert _final_metrics(shared) == _final_metrics(single)


def _launch(root: str, workdir: str, port: int, env: dict) -> list[subprocess.Popen]:
    """Two processes of one run as torchrun starts them: the coordinator and
    ranks only in MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK."""
    command = [
        *_command(root, workdir, "cluster_contrast"),
        "--config.train.checkpoint_every_steps=1",
        "--multiprocess",
    ]
    launcher = dict(MASTER_ADDR="localhost", MASTER_PORT=str(port), WORLD_SIZE="2")
    return [
        subprocess.Popen(
            command,
            env={**env, **launcher, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]


def test_torchrun_variables_give_the_distributed_settings():
    from jaxreid.parallel import torchrun_settings

    env = dict(MASTER_ADDR="node3", MASTER_PORT="29500", WORLD_SIZE="16", RANK="9")
    assert torchrun_settings(env) == dict(
        coordinator_address="node3:29500", num_processes=16, process_id=9
    )
    # 8 processes a host (one per GPU): each takes its local rank's device.
    assert torchrun_settings({**env, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}) == dict(
        coordinator_address="node3:29500", num_processes=16, process_id=9, local_device_ids=[1]
    )
    assert torchrun_settings({**env, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}) == dict(
        coordinator_address="node3:29500", num_processes=16, process_id=9
    )
    assert torchrun_settings({k: v for k, v in env.items() if k != "RANK"}) is None
    assert torchrun_settings({}) is None


def test_a_lost_process_restarts_from_the_checkpoint_with_the_same_results(tiny_root, tmp_path):
    """A two-process run (launched as torchrun launches, _launch) loses
    process 1 (SIGKILL) after step 4 of 6; the launcher then ends process 0,
    as a cluster scheduler ends the job, and starts both again with the same
    command. The run resumes from its last
    checkpoint and ends with the losses and metrics of an uninterrupted run
    (one process driving two devices, the same bits as two processes:
    test_two_processes_match_one_process_on_two_devices)."""
    import re
    import signal
    import time

    single = str(tmp_path / "single")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(
        _command(tiny_root, single, "cluster_contrast"),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    shared = str(tmp_path / "multi")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device each
    procs = _launch(tiny_root, shared, _free_port(), env)
    metrics = os.path.join(shared, "metrics.jsonl")
    deadline = time.time() + 900
    while not (os.path.exists(metrics) and len(step_losses(shared)) >= 4):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=60)
    time.sleep(2)
    procs[0].kill()  # the scheduler ends the job
    logs = [p.communicate(timeout=60)[0] for p in procs]
    assert procs[1].returncode == -signal.SIGKILL, logs[1][-2000:]
    assert not os.path.exists(os.path.join(shared, "results.json"))

    procs = _launch(tiny_root, shared, _free_port(), env)
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    with open(os.path.join(shared, "log.txt")) as f:
        resumed = [int(n) for n in re.findall(r"resumed from step (\d+) of 6", f.read())]
    assert len(resumed) == 1 and 3 <= resumed[0] < 6, resumed  # the lost work, not all of it
    assert step_losses(shared) == step_losses(single)
    assert _final_metrics(shared) == _final_metrics(single)
