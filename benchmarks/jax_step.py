"""jaxreid's compiled train step and extraction on random data, for the
speed benchmarks (benchmarks/train_step.py). Builds everything through the
same functions as training: the method's hooks, make_train_step, extract."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxreid import config_base, models
from jaxreid.evaluate.protocol import extract, output_shapes
from jaxreid.methods import TrainSet, get_method
from jaxreid.parallel import make_mesh
from jaxreid.step import (
    TrainArrays,
    TrainState,
    make_optimizer,
    make_train_step,
    phase_index,
    put_epoch_batches,
)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'cuhk03_cc.py' or 'cuhk03_uda.py:scl' -> the config (from configs/)."""
    name, _, arg = spec.partition(":")
    return config_base.load_config(os.path.join(CONFIGS, name), *([arg] if arg else []))


def random_training_set(config, num_images: int, seed: int = 0):
    """uint8 images, cameras and identities (4 images per identity)."""
    rng = np.random.default_rng(seed)
    h, w = config.data.height, config.data.width
    images = rng.integers(0, 256, (num_images, h, w, 3), dtype=np.uint8)
    identities = np.arange(num_images) // 4
    cameras = rng.integers(0, 2, num_images).astype(np.int32)
    return images, cameras, identities


def clustered_features(shapes: dict, identities: np.ndarray, seed: int = 0) -> dict:
    """Features that form one tight cluster per identity (so a clustering
    method's pseudo-labels, and hence its memory, have a realistic size)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        centres = rng.normal(size=(identities.max() + 1, *shape))
        x = centres[identities] + 0.05 * rng.normal(size=(len(identities), *shape))
        out[key] = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


def time_runs(run: Callable[[int], None], warmup: int, repeats: int) -> list[float]:
    """Seconds of `run(i)` for each of `repeats` calls after `warmup` calls
    (`run` must wait for its result). Both columns of train_step.py use it."""
    for i in range(warmup):
        run(i)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(warmup + i)
        times.append(time.perf_counter() - start)
    return times


class JaxStep:
    """The train step of `config` on random images, ready to time."""

    def __init__(self, config: ml_collections.ConfigDict, num_images: int = 512):
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.pretrained = ""  # speed does not depend on the weights
        self.config = config
        images, cameras, identities = random_training_set(config, num_images)
        method = get_method(config)
        config = method.configure(config, identities)
        mesh = make_mesh(config.train.num_devices)
        model = models.build_model(config.model, rngs=nnx.Rngs(0))
        graphdef, params, batch_stats = models.split_model(model)
        tx = make_optimizer(config, 100, models.trainable_mask(model, params))
        # Replicated over the mesh as training puts them (else the second
        # step, fed the first's replicated outputs, compiles again).
        replicated = NamedSharding(mesh, P())
        self.arrays = jax.device_put(TrainArrays(images=images, cameras=cameras), replicated)
        shapes = output_shapes(graphdef, params, batch_stats, config.data.height, config.data.width)
        train = TrainSet(
            cameras=cameras,
            identities=identities,
            extract=lambda: clustered_features(shapes, identities),
            output_shapes=shapes,
        )
        memory = method.init_memory(train)
        # The training phase (past any warm-up): the first epoch's plan with
        # a later epoch number.
        plan = method.start_epoch(
            max(config.method.get("warmup_epochs", 0), 1), train, memory, False
        )
        if plan.memory is not None:
            memory = plan.memory
        self.state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            memory=memory,
            rng=jax.random.key_data(jax.random.key(1)),
            nonfinite_step=jnp.full((), -1, jnp.int32),
        )
        self.state = jax.device_put(self.state, replicated)
        self.step = make_train_step(config, graphdef, tx, method, mesh)
        self.phase = phase_index(method, plan.phase)
        batch = config.train.batch_size
        order = np.random.default_rng(1).permutation(num_images)
        steps = num_images // batch
        self.batches = put_epoch_batches(order[: steps * batch].reshape(steps, batch), mesh)
        self.num_steps = steps
        self.batch_size = batch
        self.graphdef = graphdef
        self.images = images

    def run(self, i: int) -> None:
        self.state, metrics = self.step(
            self.state, self.arrays, self.batches, np.int32(i % self.num_steps), self.phase
        )
        jax.block_until_ready(metrics)

    def time_steps(self, warmup: int, repeats: int) -> list[float]:
        """Seconds per step after `warmup` (>= 1) steps; the first, which
        compiles, is kept in `first_step_seconds`."""
        start = time.perf_counter()
        self.run(0)
        self.first_step_seconds = time.perf_counter() - start
        return time_runs(lambda i: self.run(i + 1), warmup - 1, repeats)

    def time_extraction(self, batch: int, repeats: int) -> list[float]:
        """Seconds per eval batch of `batch` images through `extract` (the
        function evaluation and the methods use), one batch per call."""
        images = self.images[:batch]
        params, stats = self.state.params, self.state.batch_stats

        def once():
            extract(self.graphdef, params, stats, images, batch)

        once()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        return times
