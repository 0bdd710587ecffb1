"""The worked example of docs/new_method.md: instance InfoNCE against a
momentum memory, its loss, gradient and update against NumPy, and a method
written outside jaxreid, with its own settings and checks, registered and
trained through a config alone."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from helpers import step_losses, tiny_main_command, unit

from jaxreid.config_base import base_config
from jaxreid.methods import Batch, get_method, set_method
from jaxreid.methods.instance_nce import InstanceMemory

TAU, MOMENTUM = 0.2, 0.5


def _method():
    config = set_method(base_config(), "instance_nce", temperature=TAU, instance_momentum=MOMENTUM)
    return get_method(config)


def _numpy_loss(f, bank, indices):
    z = unit(f) @ bank.T / TAU
    top = z.max(axis=1, keepdims=True)
    log_p = z - (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))
    return -np.mean(log_p[np.arange(len(indices)), indices])


def test_loss_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    bank = unit(rng.normal(size=(10, 6)))
    f = rng.normal(size=(3, 6))
    indices = np.array([2, 5, 7])
    method = _method()
    memory = InstanceMemory(features=jnp.asarray(bank, jnp.float32))
    batch = Batch(indices=jnp.asarray(indices), cameras=jnp.zeros(3, jnp.int32))

    def loss(f):
        return method.loss({"global": f}, memory, batch, None, None)[0]

    np.testing.assert_allclose(
        loss(jnp.asarray(f, jnp.float32)), _numpy_loss(f, bank, indices), rtol=1e-5
    )
    grad = np.asarray(jax.grad(loss)(jnp.asarray(f, jnp.float32)))
    for i, j in [(0, 0), (1, 3), (2, 5)]:
        up, down = f.copy(), f.copy()
        up[i, j] += 1e-4
        down[i, j] -= 1e-4
        numeric = (_numpy_loss(up, bank, indices) - _numpy_loss(down, bank, indices)) / 2e-4
        np.testing.assert_allclose(grad[i, j], numeric, rtol=1e-3, atol=1e-5)


def test_update_matches_numpy_and_writes_nothing_for_negative_indices():
    rng = np.random.default_rng(1)
    bank = unit(rng.normal(size=(10, 6))).astype(np.float32)
    f = rng.normal(size=(3, 6)).astype(np.float32)
    method = _method()
    memory = InstanceMemory(features=jnp.asarray(bank))

    def update(indices):
        batch = Batch(indices=jnp.asarray(indices), cameras=jnp.zeros(3, jnp.int32))
        return np.asarray(
            method.update(memory, {"global": jnp.asarray(f)}, batch, None, None).features
        )

    new = update([2, 5, 2])  # image 2 twice: one step with the mean of its features
    expected = bank.astype(np.float64)
    expected[2] = unit(MOMENTUM * bank[2] + (1 - MOMENTUM) * unit(f[[0, 2]]).mean(axis=0))
    expected[5] = unit(MOMENTUM * bank[5] + (1 - MOMENTUM) * unit(f[1]))
    np.testing.assert_allclose(new, expected, atol=1e-6)
    np.testing.assert_array_equal(update([-1, -1, -1]), bank)


def test_a_method_written_outside_jaxreid_trains_through_a_config(tiny_root, tmp_path):
    (tmp_path / "my_method.py").write_text(
        textwrap.dedent(
            """
            import dataclasses

            from jaxreid.methods import register
            from jaxreid.methods.instance_nce import instance_nce_method


            def settings():
                return dict(temperature=0.2, instance_momentum=0.5, loss_scale=1.0)


            def problems(config):
                scale = config.method.loss_scale
                return [] if scale > 0 else [f"method.loss_scale = {scale}: must be > 0"]


            @register("my_instance_nce", settings=settings)
            def my_method(config):
                inner = instance_nce_method(config)

                def loss(outputs, memory, batch, rng, phase):
                    value, aux, metrics = inner.loss(outputs, memory, batch, rng, phase)
                    return config.method.loss_scale * value, aux, metrics

                return dataclasses.replace(
                    inner, name="my_instance_nce", loss=loss, problems=problems
                )
            """
        )
    )
    workdir = str(tmp_path / "w")
    command = [
        *tiny_main_command(tiny_root, workdir, "my_instance_nce"),
        "--config.method.module=my_method",
        "--config.method.temperature=0.1",
        "--config.train.epochs=1",
        "--config.train.steps_per_epoch=3",
        "--config.train.log_every=1",
    ]
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    losses = step_losses(workdir)
    # Three steps, each the InfoNCE of 8 samples over the N training images:
    # finite, positive, at most log N + 2/tau (|cosine| <= 1).
    assert len(losses) == 3 and all(0 < v < np.log(200) + 20 for v in losses)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["config"]["method"]["name"] == "my_instance_nce"
    # The block holds the method's own settings, the override over its defaults.
    method = results["config"]["method"]
    assert {k: method[k] for k in ("temperature", "instance_momentum", "loss_scale")} == {
        "temperature": 0.1,
        "instance_momentum": 0.5,
        "loss_scale": 1.0,
    }
    assert 0 <= results["final"]["plain"]["mAP"] <= 1
    unknown = subprocess.run(
        [*command, "--config.method.module=not_a_module"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert unknown.returncode == 2 and "method.module" in unknown.stderr
    # Its own check, and a key it does not declare: refused before training.
    for flag, words in [
        ("--config.method.loss_scale=-1", ["method.loss_scale = -1.0: must be > 0"]),
        (
            "--config.method.lam_t=0.5",
            ["method.lam_t: not a setting of method 'my_instance_nce'", "loss_scale"],
        ),
    ]:
        refused = subprocess.run(
            [*command, flag], capture_output=True, text=True, timeout=300, env=env
        )
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert all(word in refused.stderr for word in words), refused.stderr[-2000:]
