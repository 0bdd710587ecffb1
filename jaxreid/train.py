"""Training state, the compiled train step, the epoch loop, checkpoints.

One `jax.jit` function per step (donated state): uint8 batch -> augment ->
model -> method loss (SCL: selection against the banks) -> gradients -> optax
-> memory update. Data parallel over every device of a `Mesh(("data",))`: the
batch indices are sharded, params, optimizer state and memory replicated. The
batch is cut into fixed batch-norm groups of `model.bn_group_size` samples,
each device computes whole groups, and every sum over groups runs in a fixed
order (jaxreid.parallel): the same config gives the same bits on 1 or 8
devices, or on several processes. Nothing returns to the host inside an epoch
except the metrics logged every `log_every` steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxreid import augment, evaluate, models, parallel, supervised
from jaxreid.data.images import DecodedSplit
from jaxreid.data.samplers import IdentitySampler, ShuffleSampler
from jaxreid.methods import Method, get_method, prepare_config
from jaxreid.utils import UserError


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


@dataclasses.dataclass
class Data:
    train: DecodedSplit
    query: DecodedSplit
    gallery: DecodedSplit


def make_mesh(num_devices: int = 0) -> Mesh:
    """The data-parallel mesh: every device, or the first `num_devices` of a
    single-process run (for scaling studies on one host)."""
    devices = jax.devices()
    if num_devices:
        if jax.process_count() > 1:
            raise UserError(
                "train.num_devices works in a single process; a multi-process run uses every device"
            )
        if num_devices > len(devices):
            raise UserError(
                f"train.num_devices = {num_devices} but only {len(devices)} devices exist"
            )
        devices = devices[:num_devices]
    return Mesh(np.array(devices), ("data",))


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


def eval_apply_fn(graphdef) -> Callable:
    """(variables, float images) -> outputs in eval mode, for extraction."""

    def apply(variables, images):
        outputs, _ = models.apply_model(
            graphdef, variables["params"], variables["batch_stats"], images, train=False
        )
        return outputs

    return apply


def extract(graphdef, params, batch_stats, images: np.ndarray, batch_size: int, flip=False):
    return evaluate.extract_features(
        eval_apply_fn(graphdef),
        images,
        batch_size,
        flip=flip,
        params={"params": params, "batch_stats": batch_stats},
    )


def query_gallery_features(
    config: ml_collections.ConfigDict, graphdef, params, batch_stats, data: Data
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Model outputs of the query and gallery images (eval mode, config.eval.flip)."""
    return tuple(
        extract(
            graphdef, params, batch_stats, split.images, config.eval.batch_size, config.eval.flip
        )
        for split in (data.query, data.gallery)
    )


def evaluate_model(
    config: ml_collections.ConfigDict, graphdef, params, batch_stats, data: Data
) -> dict[str, Any]:
    """Extracts query / gallery features and evaluates them (`evaluate_features`)."""
    q, g = query_gallery_features(config, graphdef, params, batch_stats, data)
    return evaluate_features(config, q, g, data)


def evaluate_features(
    config: ml_collections.ConfigDict,
    q: dict[str, np.ndarray],
    g: dict[str, np.ndarray],
    data: Data,
) -> dict[str, Any]:
    """Plain protocol (global cosine) and, for models with stripes, the SCL
    distance; returns {"plain": metrics, "scl": metrics} (no arrays)."""
    labels = (data.query.pids, data.gallery.pids, data.query.cameras, data.gallery.cameras)
    results = {}
    if config.eval.rerank:
        from jaxreid.kreciprocal import k_reciprocal_rerank

        distance = k_reciprocal_rerank(q["global"], g["global"])
    else:
        distance = evaluate.cosine_distance(q["global"], g["global"])
    results["plain"] = evaluate.evaluate_ranking(distance, *labels)
    if "stripes" in q:
        distance = evaluate.scl_distance(
            q["global"],
            g["global"],
            q["stripes"],
            g["stripes"],
            data.query.cameras,
            data.gallery.cameras,
            lam_g=config.method.lam_g,
            lam_c=config.method.lam_c,
        )
        results["scl"] = evaluate.evaluate_ranking(distance, *labels)
    for metrics in results.values():
        metrics.pop("cmc", None)
    return {name: {k: float(v) for k, v in m.items()} for name, m in results.items()}


def format_metrics(title: str, results: dict[str, dict[str, float]]) -> str:
    lines = [f"{title}:", f"  {'distance':<8} {'mAP':>6} {'rank1':>6} {'rank5':>6} {'rank10':>6}"]
    for name, m in results.items():
        lines.append(
            f"  {name:<8} {100 * m['mAP']:6.1f} {100 * m['rank1']:6.1f} "
            f"{100 * m['rank5']:6.1f} {100 * m['rank10']:6.1f}"
        )
    return "\n".join(lines)


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


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef,
    tx,
    method: Method,
    mesh: Mesh,
    warmup: bool,
) -> Callable:
    """The compiled step: (state, train images, batch indices) -> (state, metrics).

    The batch is cut into G groups of `model.bn_group_size` samples; each
    device runs its G / n groups one after the other, each group its own
    augmentation (key folded with the group number), forward, method loss and
    gradient, with the same shapes whatever n. Loss, gradient and batch-norm
    statistics are the mean over groups reduced in a fixed order
    (jaxreid.parallel), so 1, 2, 4 or 8 devices give the same bits. The
    optimizer and the memory update then run replicated on the whole batch.
    Running the groups in sequence also bounds activation memory by one group.
    """
    options = augment.AugmentOptions.from_config(config.augment)
    replicated = NamedSharding(mesh, P())
    num_devices = mesh.size
    group, num_groups = batch_groups(config, num_devices)
    local_groups = num_groups // num_devices
    feature_keys = method.feature_keys

    def group_step(params, batch_stats, memory, key_data, images, indices):
        # Inside shard_map: `indices` are this device's local_groups groups.
        key = jax.random.wrap_key_data(key_data)
        k_aug, k_method = jax.random.split(key)
        first = jax.lax.axis_index(parallel.AXIS) * local_groups

        def one_group(number, idx):
            batch = augment.augment_batch(jax.random.fold_in(k_aug, number), images[idx], options)
            cams = memory.cameras[idx]

            def loss_fn(p):
                outputs, new_stats = models.apply_model(graphdef, p, batch_stats, batch, train=True)
                value, aux, metrics = method.loss(
                    outputs, memory, idx, cams, jax.random.fold_in(k_method, number), warmup
                )
                return value, (new_stats, outputs, aux, metrics)

            (value, (new_stats, outputs, aux, metrics)), grads = jax.value_and_grad(
                loss_fn, has_aux=True
            )(params)
            kept = {k: jax.lax.stop_gradient(outputs[k]) for k in feature_keys}
            return grads, new_stats, kept, aux, {"loss": value, **metrics}

        groups = indices.reshape(local_groups, group)

        def body(i, stacked):
            result = one_group(first + i, groups[i])
            return jax.tree.map(lambda buf, x: buf.at[i].set(x), stacked, result)

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

    sharded_step = jax.shard_map(
        group_step,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(), P(), P(parallel.AXIS)),
        out_specs=P(),
        check_vma=False,
    )

    def step_fn(state: TrainState, images: jax.Array, indices: jax.Array):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grads, new_stats, metrics, (outputs, aux, all_indices) = sharded_step(
            state.params,
            state.batch_stats,
            state.memory,
            jax.random.key_data(key),
            images,
            indices,
        )
        loss = metrics["loss"]
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss keeps the old state and records the step.
        finite = jnp.isfinite(loss)

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_memory = method.update_memory(
            state.memory, outputs, all_indices, aux, warmup, after=grads, enabled=finite
        )
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            batch_stats=keep(new_stats, state.batch_stats),
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
        out_shardings=(replicated, replicated),
    )


# --------------------------------------------------------------------------
# Checkpoints


class Checkpoints:
    """orbax managers for the latest state (for resume) and the best one (by
    plain mAP), each with a JSON sidecar holding the loop's history."""

    def __init__(self, workdir: str, keep: int = 1):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        # Synchronous saves: the loop waits for each save anyway, and async
        # managers warn at every save that they waited for the previous one.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        root = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=options)
        self.best = ocp.CheckpointManager(
            os.path.join(root, "best"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        )

    def save(self, manager, state: TrainState, meta: dict) -> None:
        ocp = self._ocp
        step = int(state.step)
        if manager.latest_step() == step:
            return
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        manager.wait_until_finished()

    def restore(self, manager, abstract_state: TrainState, step: int | None = None):
        ocp = self._ocp
        step = manager.latest_step() if step is None else step
        if step is None:
            return None, None
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.latest.close()
        self.best.close()


# --------------------------------------------------------------------------
# Metrics output


class MetricWriter:
    """JSON lines always; TensorBoard through clu when its writers import
    (they need TensorFlow, so they stay optional)."""

    def __init__(self, workdir: str):
        # One writer per run: process 0 (the values are replicated).
        self.jsonl = None
        self.clu = None
        if jax.process_index() == 0:
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                # TensorFlow's start-up chatter (TF only writes the summaries).
                os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
                os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
                from clu import metric_writers

                self.clu = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
            except Exception as e:  # noqa: BLE001 -- any import problem means "no TensorBoard"
                logging.warning("TensorBoard summaries off (%s); metrics.jsonl only", e)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.clu is not None:
            self.clu.write_scalars(step, scalars)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.clu is not None:
            self.clu.flush()
            self.clu.close()


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves at the next step and exits."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.requested:  # second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: saving a checkpoint at the next step", file=sys.stderr)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainingInterrupted(Exception):
    pass


# --------------------------------------------------------------------------
# The loop


def _host_key(seed: int) -> np.ndarray:
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


class ClusteringError(UserError):
    pass


def _output_shapes(graphdef, params, batch_stats, config) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the model's eval outputs (traced, nothing computed)."""
    image = jax.ShapeDtypeStruct((1, config.data.height, config.data.width, 3), jnp.float32)
    out = jax.eval_shape(
        eval_apply_fn(graphdef), {"params": params, "batch_stats": batch_stats}, image
    )
    return {k: v.shape[1:] for k, v in out.items()}


def initial_state(config, model, tx, method: Method, data: Data, mesh: Mesh):
    graphdef, params, batch_stats = models.split_model(model)
    n = len(data.train.images)
    if method.clustering:
        # A placeholder of the right shapes; the first epoch's clustering fills it.
        shapes = _output_shapes(graphdef, params, batch_stats, config)
        features = {k: np.zeros((n, *shapes[k]), np.float32) for k in method.feature_keys}
    elif method.feature_keys:
        features = extract(graphdef, params, batch_stats, data.train.images, config.eval.batch_size)
    else:
        features = {}
    # Identity labels reach only the supervised reference.
    labels = supervised.relabel(data.train.pids) if method.reads_identities else None
    memory = method.init_memory(
        {k: features[k] for k in method.feature_keys}, data.train.cameras, labels
    )
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        memory=memory,
        rng=jnp.asarray(_host_key(config.seed + 1)),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )
    # Through the host: in a multi-process run the replicated state spans the
    # devices of every process.
    return graphdef, jax.device_put(jax.device_get(state), NamedSharding(mesh, P()))


def recluster(
    config, graphdef, state: TrainState, method: Method, data: Data, mesh: Mesh, epoch: int
) -> tuple[TrainState, dict[str, float], np.ndarray]:
    """Extracts the training set (eval mode, no augmentation), clusters it and
    puts the method's fresh memory into the state. Returns (state, stats,
    pseudo-labels)."""
    from jaxreid import clustering

    start = time.time()
    features = extract(
        graphdef, state.params, state.batch_stats, data.train.images, config.eval.batch_size
    )
    extracted = time.time()
    labels = clustering.cluster_features(
        features["global"], config.cluster, cameras=data.train.cameras
    )
    stats = clustering.pseudo_label_stats(labels)
    memory = method.init_memory(
        {k: features[k] for k in method.feature_keys}, data.train.cameras, labels
    )
    needed = config.train.batch_size // config.train.num_instances
    sampled = method.sampler_labels(memory)
    if len(np.unique(sampled[sampled >= 0])) < needed:
        raise ClusteringError(
            f"epoch {epoch + 1}: clustering gave {stats['num_clusters']} clusters and "
            f"{stats['num_outliers']} outliers of {stats['num_samples']} images, but a batch "
            f"needs {needed} pseudo-identities (train.batch_size / train.num_instances). "
            + (
                # Mostly outliers: the neighbourhoods are too tight.
                f"Raise cluster.eps (now {config.cluster.eps}) or lower cluster.min_samples "
                f"(now {config.cluster.min_samples}), or lower train.batch_size"
                if stats["num_outliers"] > stats["num_samples"] / 2
                # Few, large clusters: neighbourhoods merge different people.
                else f"Lower cluster.eps (now {config.cluster.eps}) or raise "
                f"cluster.min_samples (now {config.cluster.min_samples}), or lower "
                f"train.batch_size"
            )
        )
    state = state.replace(memory=jax.device_put(memory, NamedSharding(mesh, P())))
    stats = {
        "num_clusters": stats["num_clusters"],
        "outlier_fraction": stats["outlier_fraction"],
        "largest_cluster": stats["largest_cluster"],
        "extract_s": extracted - start,
        "cluster_s": time.time() - extracted,
    }
    return state, stats, labels


def make_sampler(config, method: Method, state: TrainState, data: Data, epoch_steps: int):
    """The epoch's batch sampler: P x K over the method's (pseudo-)labels, or a shuffle."""
    if method.sampler_labels is None:
        return ShuffleSampler(len(data.train.images), config.train.batch_size, seed=config.seed)
    # sampler_labels reads one (N,) leaf with np.asarray: only that array
    # leaves the device, not the whole memory.
    labels = method.sampler_labels(state.memory)
    return IdentitySampler(
        labels,
        data.train.cameras,
        config.train.batch_size,
        config.train.num_instances,
        seed=config.seed,
        num_steps=epoch_steps,
    )


def _put_batch(indices: np.ndarray, mesh: Mesh) -> jax.Array:
    """Global batch indices -> a sharded array; each process feeds its slice."""
    sharding = NamedSharding(mesh, P("data"))
    per_process = len(indices) // jax.process_count()
    start = jax.process_index() * per_process
    local = indices[start : start + per_process]
    return jax.make_array_from_process_local_data(sharding, local, (len(indices),))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, data: Data, log: Callable[[str], None]
) -> dict[str, Any]:
    """Trains `config.method` and returns the results dict of results.json."""
    start_time = time.time()
    config = prepare_config(config, data.train.pids)
    mesh = make_mesh(config.train.num_devices)
    batch_size = config.train.batch_size
    batch_groups(config, mesh.size)  # a clear error before any work
    method = get_method(config)
    one_pass = len(data.train.images) // batch_size
    if method.clustering:  # a fixed number of P x K steps ("iters") per epoch
        steps_per_epoch = config.train.steps_per_epoch or one_pass
    else:
        steps_per_epoch = min(config.train.steps_per_epoch or one_pass, one_pass)
    total_steps = steps_per_epoch * config.train.epochs
    model = models.build_model(config.model, rngs=nnx.Rngs(config.seed))
    _, params, _ = models.split_model(model)
    tx = make_optimizer(config, steps_per_epoch, models.trainable_mask(model, params))
    del params
    graphdef, state = initial_state(config, model, tx, method, data, mesh)
    del model
    checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints)
    meta: dict[str, Any] = {"history": [], "best_map": -1.0, "initial": None}
    restored, restored_meta = checkpoints.restore(checkpoints.latest, state)
    if restored is not None:
        state = jax.device_put(restored, NamedSharding(mesh, P()))
        meta = restored_meta
        log(f"resumed from step {int(state.step)} of {total_steps}")
    if meta["initial"] is None:
        meta["initial"] = evaluate_model(config, graphdef, state.params, state.batch_stats, data)
    log(format_metrics("before training", meta["initial"]))

    images = jax.device_put(data.train.images, NamedSharding(mesh, P()))
    steps = {
        warm: make_train_step(config, graphdef, tx, method, mesh, warm) for warm in (True, False)
    }
    writer = MetricWriter(workdir)
    stop = _StopRequest()
    from tqdm.auto import tqdm

    try:
        step = int(state.step)
        first_step = step
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            warmup = not method.clustering and epoch < config.method.warmup_epochs
            if method.clustering and in_epoch == 0:
                state, stats, labels = recluster(config, graphdef, state, method, data, mesh, epoch)
                writer.write(step, {f"cluster/{k}": v for k, v in stats.items()})
                if jax.process_index() == 0:  # for benchmarks/pseudo_label_quality.py
                    labels_dir = os.path.join(workdir, "pseudo_labels")
                    os.makedirs(labels_dir, exist_ok=True)
                    np.save(os.path.join(labels_dir, f"epoch_{epoch + 1:03d}.npy"), labels)
                log(
                    f"epoch {epoch + 1}: {stats['num_clusters']} clusters, "
                    f"{100 * stats['outlier_fraction']:.1f}% outliers, largest "
                    f"{stats['largest_cluster']} (extract {stats['extract_s']:.1f}s, "
                    f"cluster {stats['cluster_s']:.1f}s)"
                )
            sampler = make_sampler(config, method, state, data, steps_per_epoch)
            batches = sampler.epoch_batches(epoch)[:steps_per_epoch]
            bar = tqdm(
                total=steps_per_epoch,
                initial=in_epoch,
                desc=f"epoch {epoch + 1}",
                unit="step",
                disable=None,
                file=sys.stderr,
            )
            tick, tick_step = time.time(), step
            for i in range(in_epoch, steps_per_epoch):
                budget = config.train.stop_after_steps
                if stop.requested or (budget and step - first_step >= budget):
                    _check_finite(state, checkpoints)
                    checkpoints.save(checkpoints.latest, state, meta)
                    raise TrainingInterrupted(
                        f"stopped at step {step}; run the same command to resume"
                    )
                state, metrics = steps[warmup](state, images, _put_batch(batches[i], mesh))
                step += 1
                last = i == steps_per_epoch - 1
                if step % config.train.log_every == 0 or last:
                    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    _check_finite(state, checkpoints)
                    rate = (step - tick_step) * batch_size / max(time.time() - tick, 1e-9)
                    scalars["images_per_s"] = rate
                    writer.write(step, {**scalars, "epoch": epoch})
                    log(
                        f"step {step}/{total_steps} epoch {epoch + 1} loss {scalars['loss']:.4f}"
                        f" {rate:.1f} img/s"
                    )
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", img_s=f"{rate:.1f}")
                    tick, tick_step = time.time(), step
                bar.update(1)
                if step % config.train.checkpoint_every_steps == 0 and not last:
                    _check_finite(state, checkpoints)
                    checkpoints.save(checkpoints.latest, state, meta)
            bar.close()
            epoch += 1
            if epoch % config.train.eval_every == 0 or step == total_steps:
                result = evaluate_model(config, graphdef, state.params, state.batch_stats, data)
                meta["history"].append({"epoch": epoch, "step": step, **result})
                writer.write(
                    step, {f"eval/{d}/{k}": v for d, m in result.items() for k, v in m.items()}
                )
                log(format_metrics(f"epoch {epoch}", result))
                if result["plain"]["mAP"] > meta["best_map"]:
                    meta["best_map"] = result["plain"]["mAP"]
                    checkpoints.save(checkpoints.best, state, meta)
            checkpoints.save(checkpoints.latest, state, meta)
    finally:
        stop.restore()
        writer.close()
        checkpoints.close()

    final = meta["history"][-1] if meta["history"] else None
    return {
        "initial": meta["initial"],
        "final": {k: v for k, v in final.items() if k not in ("epoch", "step")} if final else None,
        "history": meta["history"],
        "steps": total_steps,
        "train_wall_time_s": time.time() - start_time,
    }


def _check_finite(state: TrainState, checkpoints: Checkpoints) -> None:
    bad = int(state.nonfinite_step)
    if bad >= 0:
        latest = checkpoints.latest.latest_step()
        raise FloatingPointError(
            f"the loss became NaN or inf at step {bad}; that step and the ones after it "
            f"were not applied and nothing was saved after them (last checkpoint: step "
            f"{latest}). Lower the learning rate or check the data."
        )
