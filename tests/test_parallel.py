"""Fixed-order reductions (jaxreid.parallel) and the batch layout check."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import simulated_devices_env

from jaxreid.config_base import base_config
from jaxreid.parallel import pairwise_sum
from jaxreid.step import batch_groups
from jaxreid.utils import UserError


def test_pairwise_sum_adds_in_a_balanced_tree():
    # In float32 1e8 + 1 rounds to 1e8. Left to right: ((1e8 + 1) - 1e8) + 1 = 1;
    # the tree: (1e8 + 1) + (-1e8 + 1) = 1e8 - 1e8 = 0.
    x = jnp.asarray([1e8, 1.0, -1e8, 1.0], jnp.float32)
    assert float(pairwise_sum(x)) == 0.0
    # Odd counts carry the last term up a level: ((a + b) + c).
    y = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], jnp.float32)
    np.testing.assert_array_equal(pairwise_sum(y), [9.0, 12.0])


def test_batch_groups_checks_the_layout():
    c = base_config()
    c.train.batch_size, c.model.bn_group_size = 32, 8
    assert batch_groups(c, 1) == (8, 4)
    assert batch_groups(c, 4) == (8, 4)
    with pytest.raises(UserError, match="4 group\\(s\\), which 8 devices"):
        batch_groups(c, 8)
    c.model.bn_group_size = 0  # the whole batch: one group, one device
    assert batch_groups(c, 1) == (32, 1)
    c.model.bn_group_size = 5
    with pytest.raises(UserError, match="not a multiple of model.bn_group_size"):
        batch_groups(c, 1)


_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jaxreid import parallel
rng = np.random.default_rng(0)
# 8 groups' gradients of a two-leaf pytree, with magnitudes that make the sum
# order visible in float32.
scale = 10.0 ** rng.integers(-4, 4, (8, 1, 1))
grads = {"w": (rng.normal(size=(8, 5, 7)) * scale).astype(np.float32),
         "b": rng.normal(size=(8, 3)).astype(np.float32)}
out = {}
for n in (1, 2, 4, 8):
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    def f(g):
        means = parallel.mean_gradients(g, n), parallel.mean_over_groups(g)
        return *means, parallel.gather_groups(g)
    fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P(), check_vma=False))
    mean, small_mean, gathered = jax.device_get(fn(grads))
    np.testing.assert_array_equal(gathered["w"], grads["w"])
    out[n] = {k: [mean[k].tobytes().hex(), small_mean[k].tobytes().hex()] for k in mean}
    out[f"ref{n}"] = {k: float(np.abs(mean[k] - grads[k].astype(np.float64).mean(0)).max())
                      for k in mean}
print(json.dumps(out))
"""


def test_mean_gradients_same_bits_on_1_2_4_8_devices():
    env = simulated_devices_env(8)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for n in (2, 4, 8):
        assert result[str(n)] == result["1"], n
    # ... and it is the mean: float32 rounding of values up to ~1e4.
    assert max(result["ref1"].values()) < 1e-2


_SHARDED_TABLE_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jaxreid import parallel
rng = np.random.default_rng(1)
rows, dim, group, chunks = 37, 6, 3, 8
padded = parallel.padded_rows(rows, chunks)
table = np.zeros((padded, dim), np.float32)
table[:rows] = rng.normal(size=(rows, dim)) * 10.0 ** rng.integers(-3, 3, (rows, 1))
features = rng.normal(size=(8, group, dim)).astype(np.float32)  # 8 groups
weights = rng.normal(size=(8, group, rows)).astype(np.float32)
out = {}
for n in (1, 2, 4, 8):
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    def f(feats, w, shard):
        sims, grads = [], []
        for g in range(feats.shape[0]):  # this device's groups
            def loss(x):
                s = parallel.row_sharded_similarities(x, shard, chunks, rows)
                return jnp.sum(w[g] * s), s
            (_, s), grad = jax.value_and_grad(loss, has_aux=True)(feats[g])
            sims.append(s)
            grads.append(grad)
        return parallel.gather_groups((jnp.stack(sims), jnp.stack(grads)))
    fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P("data"), P("data")),
                               out_specs=P(), check_vma=False))
    sims, grads = jax.device_get(fn(features, weights, table))
    out[n] = [sims.tobytes().hex(), grads.tobytes().hex()]
    t = table[:rows].astype(np.float64)
    out[f"ref{n}"] = [
        float(np.abs(sims - features.astype(np.float64) @ t.T).max() / np.abs(t).max()),
        float(np.abs(grads - weights.astype(np.float64) @ t).max() / np.abs(t).max()),
    ]
try:
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    jax.jit(jax.shard_map(lambda x, t: parallel.row_sharded_similarities(x[0], t, 4, rows),
                          mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"),
                          check_vma=False))(features, table)
    out["error"] = ""
except Exception as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def test_row_sharded_table_gives_its_products_and_gradient_with_the_same_bits_on_1_to_8_devices():
    env = simulated_devices_env(8)
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED_TABLE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for n in (2, 4, 8):
        assert result[str(n)] == result["1"], n
    # The products and the features' gradient (weights @ table) of every group,
    # against float64; rows span six orders of magnitude, so the bound is
    # relative to the largest.
    for n in (1, 8):
        assert max(result[f"ref{n}"]) < 1e-5, result[f"ref{n}"]
    # 4 chunks cannot be shared by 8 devices: the setting is named.
    assert "instance_shards to a multiple of 8" in result["error"]
