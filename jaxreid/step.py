"""The training state and the compiled train step.

One `jax.jit` function for every step of a run (donated state): uint8 batch -> augment ->
model -> method loss -> gradients -> optax -> method memory update. Data
parallel over every device of a `Mesh(("data",))`: the epoch's batch indices
are sharded along the batch, params, optimizer state and memory replicated.
The batch is cut into fixed batch-norm groups of `model.bn_group_size`
samples, each device computes whole groups, and every sum over groups runs in
a fixed order (jaxreid.parallel): the same config gives the same bits on 1 or
8 devices, or on several processes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxreid import augment, models, parallel
from jaxreid.methods import Batch, Method
from jaxreid.utils import UserError

# Folded into a step's key to give the model's key (see group_step).
MODEL_KEY_SALT = 0x6D6F64


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    memory: Any
    rng: jax.Array  # raw uint32 key (checkpointable as a plain array)
    # First step whose loss was NaN/inf (-1: none). Such a step leaves the
    # state unchanged, so nothing corrupt is ever saved.
    nonfinite_step: jax.Array
    # The mean model {"params", "batch_stats"} (train.ema_decay > 0), else None.
    ema: Any = None


def model_variables(state: TrainState) -> tuple[Any, Any]:
    """(params, batch_stats) of the model a run extracts and evaluates: the
    mean model where there is one."""
    if state.ema is not None:
        return state.ema["params"], state.ema["batch_stats"]
    return state.params, state.batch_stats


def update_ema(ema: Any, new: Any, decay: float) -> Any:
    """ema + (1 - decay) (new - ema), leaf by leaf: a leaf equal to its
    average (a frozen stage) stays the same bits."""
    return jax.tree.map(lambda e, x: e + (1.0 - decay) * (x - e), ema, new)


class TrainArrays(struct.PyTreeNode):
    """The training set on the devices, uploaded once (replicated)."""

    images: jax.Array  # (N, H, W, 3) uint8
    cameras: jax.Array  # (N,) int32
    domains: jax.Array | None = None  # (N,) int32 (methods.TARGET_DOMAIN / SOURCE_DOMAIN)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, trainable: Any = None):
    """SGD (Nesterov) or Adam with coupled weight decay (added to the gradient,
    as torch's `weight_decay`, biases included) and a per-step schedule.
    `trainable`: a bool pytree over the params (models.trainable_mask); False
    leaves (frozen stages) are never updated, weight decay included."""
    o = config.optimizer
    if o.schedule == "constant":
        lr = o.lr
    elif o.schedule == "step":
        lr = optax.exponential_decay(
            o.lr, o.step_epochs * steps_per_epoch, o.step_factor, staircase=True
        )
    elif o.schedule == "cosine":
        lr = optax.cosine_decay_schedule(o.lr, config.train.epochs * steps_per_epoch)
    else:
        raise ValueError(f"unknown schedule {o.schedule!r}: constant | step | cosine")
    if o.name == "sgd":
        base = optax.sgd(lr, momentum=o.momentum, nesterov=o.nesterov)
    elif o.name == "adam":
        base = optax.adam(lr)
    else:
        raise ValueError(f"unknown optimizer {o.name!r}: sgd | adam")
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay), base)
    if trainable is None or all(jax.tree_util.tree_leaves(trainable)):
        return tx
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def batch_groups(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
    """(group size, number of groups) of the training batch: the batch-norm
    groups, which are also the units the devices share out. Raises UserError
    when the batch cannot be split into whole groups per device."""
    batch = config.train.batch_size
    group = config.model.bn_group_size or batch
    if batch % group:
        raise UserError(
            f"train.batch_size {batch} is not a multiple of model.bn_group_size {group}"
        )
    groups = batch // group
    if groups % num_devices:
        raise UserError(
            f"train.batch_size {batch} in batch-norm groups of {group} makes {groups} "
            f"group(s), which {num_devices} devices cannot share evenly: every device "
            f"trains whole groups so that the result does not depend on the device count. "
            f"Set model.bn_group_size (or train.batch_size) so that batch_size / "
            f"bn_group_size is a multiple of {num_devices}, or run on fewer devices "
            f"(CUDA_VISIBLE_DEVICES)"
        )
    return group, groups


def computed_after(x: Any, deps: Any) -> Any:
    """x unchanged (bit for bit), but with a data dependency on every leaf of deps.

    The memory writes must wait for every read of the memory in the step (the
    backward pass reads it): with that dependency XLA updates the donated
    memory in place instead of copying it first (~100 ms per step on a 2-core
    CPU for the default method's banks at N = 12,936). `lax.optimization_barrier` does not
    survive XLA's CPU pipeline. One element of every leaf of deps, times 0.0,
    added to the first element of every leaf of x: XLA keeps `0.0 * s` (it is
    NaN for s = inf), and s is made finite first.
    """
    tails = [jnp.ravel(leaf)[-1:] for leaf in jax.tree.leaves(deps) if jnp.size(leaf)]
    if not tails:
        return x
    s = sum(jnp.sum(t.astype(jnp.float32)) for t in tails)
    zero = 0.0 * jnp.where(jnp.isfinite(s), s, 0.0)
    # Not to all of x: XLA fused the whole sum into the loop over x and
    # recomputed it per element (40 ms per ResNet-50 step of the default method).
    return jax.tree.map(lambda a: a.at[(0,) * a.ndim].add(zero.astype(a.dtype)), x)


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef,
    tx,
    method: Method,
    mesh: Mesh,
    memory_specs: Any = None,
) -> Callable:
    """The compiled step: (state, train arrays, epoch batches, i, phase) ->
    (state, metrics), training on batch `i` of the epoch's (steps, B) index
    array (on the devices once per epoch) in `phase`, an index into
    `method.phases` (`phase_index`). One program serves every phase: a
    method with several (a warm-up, then selection) branches at run time instead of
    compiling a step per phase.

    The batch is cut into G groups of `model.bn_group_size` samples; each
    device runs its G / n groups one after the other, each group its own
    augmentation (key folded with the group number), forward, method loss and
    gradient, with the same shapes whatever n. Loss, gradient and batch-norm
    statistics are the mean over groups reduced in a fixed order
    (jaxreid.parallel), so 1, 2, 4 or 8 devices give the same bits. The
    optimizer and the memory update then run replicated on the whole batch.
    Running the groups in sequence also bounds activation memory by one group.

    `memory_specs`: the memory's PartitionSpecs (`memory_partition`; None:
    every leaf replicated). A leaf sharded by rows stays so across the step:
    the loss sees this device's rows, the update the whole (sharded) leaf.
    """
    options = augment.AugmentOptions.from_config(config.augment)
    replicated = NamedSharding(mesh, P())
    num_devices = mesh.size
    group, num_groups = batch_groups(config, num_devices)
    local_groups = num_groups // num_devices
    feature_keys = method.feature_keys
    method_loss = by_phase(method.loss, method.phases)
    method_update = by_phase(method.update, method.phases)

    def group_step(params, batch_stats, memory, key_data, arrays, batches, i, phase):
        # Inside shard_map: `batches` holds this device's local_groups groups
        # of every batch of the epoch.
        key = jax.random.wrap_key_data(key_data)
        k_aug, k_method = jax.random.split(key)
        # The model's own randomness (drop-path, WaveBlock): a key apart from
        # the two above, so adding it changed no existing run's draws.
        k_model = jax.random.fold_in(key, MODEL_KEY_SALT)
        first = jax.lax.axis_index(parallel.AXIS) * local_groups
        indices = batches[i]

        def one_group(number, idx):
            images = augment.augment_batch(
                jax.random.fold_in(k_aug, number), arrays.images[idx], options
            )
            batch = Batch(indices=idx, cameras=arrays.cameras[idx], domains=_domains(arrays, idx))

            def loss_fn(p):
                outputs, new_stats = models.apply_model(
                    graphdef,
                    p,
                    batch_stats,
                    images,
                    train=True,
                    rng=jax.random.fold_in(k_model, number),
                    cameras=batch.cameras,
                )
                value, aux, metrics = method_loss(
                    phase, outputs, memory, batch, jax.random.fold_in(k_method, number)
                )
                return value, (new_stats, outputs, aux, metrics)

            (value, (new_stats, outputs, aux, metrics)), grads = jax.value_and_grad(
                loss_fn, has_aux=True
            )(params)
            kept = {k: jax.lax.stop_gradient(outputs[k]) for k in feature_keys}
            return grads, new_stats, kept, aux, {"loss": value, **metrics}

        groups = indices.reshape(local_groups, group)

        def body(g, stacked):
            result = one_group(first + g, groups[g])
            return jax.tree.map(lambda buf, x: buf.at[g].set(x), stacked, result)

        shapes = jax.eval_shape(one_group, first, groups[0])
        stacked = jax.tree.map(lambda s: jnp.zeros((local_groups, *s.shape), s.dtype), shapes)
        # A loop whose trip count XLA cannot see: with a known count of 1 it
        # inlines the body and fuses it differently, which changed the
        # batch-norm statistics in the last bit (8 groups on 8 devices vs 1).
        trips = jax.lax.optimization_barrier(jnp.int32(local_groups))
        grads, stats, outputs, aux, metrics = jax.lax.fori_loop(0, trips, body, stacked)
        # (G, group, ...) -> (B, ...): the whole batch, in batch order.
        whole = parallel.gather_groups((outputs, aux, groups))
        whole = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), whole)
        return (
            parallel.mean_gradients(grads, num_devices),
            parallel.mean_over_groups(stats),
            parallel.mean_over_groups(metrics),
            whole,
        )

    memory_specs = P() if memory_specs is None else memory_specs
    state_shardings = TrainState(
        step=replicated,
        params=replicated,
        batch_stats=replicated,
        opt_state=replicated,
        memory=spec_shardings(memory_specs, mesh),
        rng=replicated,
        nonfinite_step=replicated,
        ema=replicated,
    )
    sharded_step = jax.shard_map(
        group_step,
        mesh=mesh,
        in_specs=(P(), P(), memory_specs, P(), P(), P(None, parallel.AXIS), P(), P()),
        out_specs=P(),
        check_vma=False,
    )

    def step_fn(
        state: TrainState, arrays: TrainArrays, batches: jax.Array, i: jax.Array, phase: jax.Array
    ):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grads, new_stats, metrics, (outputs, aux, indices) = sharded_step(
            state.params,
            state.batch_stats,
            state.memory,
            jax.random.key_data(key),
            arrays,
            batches,
            i,
            phase,
        )
        loss = metrics["loss"]
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss keeps the old state and records the step.
        finite = jnp.isfinite(loss)

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        # The writes wait for the gradients (and aux, e.g. selected candidates,
        # which read the whole memory); a non-finite step writes nothing.
        outputs = computed_after(outputs, (aux, grads))
        batch = Batch(
            indices=jnp.where(finite, indices, -1),
            cameras=arrays.cameras[indices],
            domains=_domains(arrays, indices),
        )
        new_memory = method_update(phase, state.memory, outputs, batch, aux)
        params = keep(params, state.params)
        new_stats = keep(new_stats, state.batch_stats)
        ema = state.ema
        if ema is not None:
            current = {"params": params, "batch_stats": new_stats}
            ema = update_ema(ema, current, config.train.ema_decay)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=new_stats,
            ema=ema,
            opt_state=keep(opt_state, state.opt_state),
            memory=new_memory,
            nonfinite_step=jnp.where(
                (state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step
            ),
        )
        metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
        return new_state, metrics

    return jax.jit(
        step_fn,
        donate_argnums=(0,),
        out_shardings=(state_shardings, replicated),
    )


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def memory_partition(method: Method, memory: Any) -> Any:
    """The PartitionSpecs of a method's memory (Method.memory_specs; without
    it, P() for every leaf: replicated)."""
    if method.memory_specs is None:
        return jax.tree.map(lambda _: P(), memory)
    return method.memory_specs(memory)


def spec_shardings(specs: Any, mesh: Mesh) -> Any:
    """The NamedShardings on `mesh` of a pytree of PartitionSpecs."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def place_memory(memory: Any, specs: Any, mesh: Mesh) -> Any:
    """`memory` (host or device arrays) on the mesh's devices as `specs` say."""
    return jax.device_put(memory, spec_shardings(specs, mesh))


def place_state(state: TrainState, specs: Any, mesh: Mesh) -> TrainState:
    """The state (host arrays, or arrays on the mesh) on the mesh: replicated,
    its memory as `specs` say."""
    replicated = NamedSharding(mesh, P())
    rest = jax.device_put(state.replace(memory=None), replicated)
    return rest.replace(memory=place_memory(state.memory, specs, mesh))


def _domains(arrays: TrainArrays, indices: jax.Array) -> jax.Array:
    if arrays.domains is None:
        return jnp.zeros(indices.shape, jnp.int32)
    return arrays.domains[indices]


def phase_index(method: Method, phase: Hashable) -> np.int32:
    """The train step's `phase` argument for an EpochPlan's phase."""
    if phase not in method.phases:
        raise ValueError(
            f"method {method.name!r} planned phase {phase!r}, not one of its phases "
            f"{method.phases}: list it in Method.phases"
        )
    return np.int32(method.phases.index(phase))


def by_phase(hook: Callable, phases: tuple[Hashable, ...]) -> Callable:
    """hook(*args, phase) as f(index, *args): a switch over one branch per
    phase, each traced with its phase as a Python value (one phase: a call)."""
    if len(phases) == 1:
        return lambda index, *args: hook(*args, phases[0])
    branches = [lambda *args, p=p: hook(*args, p) for p in phases]
    return lambda index, *args: jax.lax.switch(index, branches, *args)


def put_epoch_batches(batches: np.ndarray, mesh: Mesh) -> jax.Array:
    """(steps, B) global batch indices -> one array sharded along B; each
    process feeds its slice of every batch."""
    sharding = NamedSharding(mesh, P(None, parallel.AXIS))
    per_process = batches.shape[1] // jax.process_count()
    start = jax.process_index() * per_process
    local = np.ascontiguousarray(batches[:, start : start + per_process])
    return jax.make_array_from_process_local_data(sharding, local, batches.shape)
