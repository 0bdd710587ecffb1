"""The epoch loop: it calls the method's hooks (jaxreid.methods) and knows no
method. Per epoch: `start_epoch` on the host (e.g. re-clustering), the
epoch's batches to the devices once, the compiled steps (jaxreid.step),
evaluation, checkpoints. Nothing returns to the host inside an epoch except
the metrics logged every `log_every` steps."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxreid import models
from jaxreid.checkpoints import Checkpoints
from jaxreid.data.images import DecodedSplit
from jaxreid.data.samplers import (
    CameraGroupSampler,
    IdentitySampler,
    ShuffleSampler,
    TwoDomainSampler,
)
from jaxreid.evaluate.protocol import (
    evaluate_model,
    extract_training_set,
    format_metrics,
    output_shapes,
)
from jaxreid.methods import (
    SOURCE_DOMAIN,
    TARGET_DOMAIN,
    EpochPlan,
    Method,
    TrainSet,
    get_method,
)
from jaxreid.parallel import make_mesh
from jaxreid.run_io import MetricWriter, StopRequest, TrainingInterrupted
from jaxreid.step import (
    TrainArrays,
    TrainState,
    batch_groups,
    make_optimizer,
    make_train_step,
    memory_partition,
    model_variables,
    phase_index,
    place_memory,
    place_state,
    put_epoch_batches,
)
from jaxreid.utils import UserError

__all__ = ["Data", "TrainingInterrupted", "train_and_evaluate"]


@dataclasses.dataclass
class Data:
    train: DecodedSplit
    query: DecodedSplit
    gallery: DecodedSplit
    # The labelled source of a two-domain run (data.source_root), else None.
    source: DecodedSplit | None = None


def with_source(data: Data) -> tuple[Data, np.ndarray]:
    """(data, domains): a two-domain run's training split as one set, the
    target's images first (their rows as in a one-domain run) and the
    source's after, with the source's cameras numbered after the target's and
    every target identity hidden (-1): nothing downstream can read one.
    One domain: `data` unchanged, every row TARGET_DOMAIN."""
    target = data.train
    if data.source is None:
        return data, np.full(len(target.records), TARGET_DOMAIN, np.int32)
    first_camera = int(target.cameras.max()) + 1 if len(target.records) else 0
    records = [dataclasses.replace(r, pid=-1, index=i) for i, r in enumerate(target.records)] + [
        dataclasses.replace(r, camera=r.camera + first_camera, index=len(target.records) + i)
        for i, r in enumerate(data.source.records)
    ]
    train = DecodedSplit(np.concatenate([target.images, data.source.images]), records)
    domains = np.repeat(
        np.int32([TARGET_DOMAIN, SOURCE_DOMAIN]), [len(target.records), len(data.source.records)]
    )
    return dataclasses.replace(data, train=train, source=None), domains


def _host_key(seed: int) -> np.ndarray:
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


def _train_set(
    config, graphdef, data: Data, arrays: TrainArrays, domains: np.ndarray, variables: Callable
) -> TrainSet:
    """The method's view of the training set; `variables()` -> (params,
    batch_stats) of the moment the method extracts."""

    # Single process: extract from the images already on the devices. A
    # multi-process run extracts on every host from its own host copy.
    images = arrays.images if jax.process_count() == 1 else data.train.images
    cameras = data.train.cameras

    def extract_train(rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        params, batch_stats = variables()
        if rows is None:
            return extract_training_set(config, graphdef, params, batch_stats, images, cameras)
        rows = np.asarray(rows)
        return extract_training_set(
            config, graphdef, params, batch_stats, images[rows], cameras[rows]
        )

    params, batch_stats = variables()
    return TrainSet(
        cameras=data.train.cameras,
        identities=data.train.pids,
        extract=extract_train,
        output_shapes=output_shapes(
            graphdef, params, batch_stats, config.data.height, config.data.width
        ),
        domains=domains,
    )


def _sampler(config, plan: EpochPlan, data: Data, domains: np.ndarray, steps: int):
    """The epoch's batch sampler: P x K over the plan's labels (with
    `train.camera_groups`, one camera per batch-norm group), or a shuffle; in
    a two-domain run a source P x K part and a target part (TwoDomainSampler)."""
    if np.any(domains == SOURCE_DOMAIN):
        if plan.sampler_labels is None:
            raise UserError(
                f"method {config.method.name} trains on two domains but gave no sampler "
                "labels: its start_epoch must label the source rows (EpochPlan.sampler_labels)"
            )
        batch = config.train.batch_size
        return TwoDomainSampler(
            plan.sampler_labels,
            data.train.cameras,
            domains,
            batch,
            config.train.source_batch_size or batch // 2,
            config.train.num_instances,
            seed=config.seed,
            num_steps=steps,
        )
    if plan.sampler_labels is None:
        if config.train.camera_groups:
            raise UserError(
                f"train.camera_groups needs a method that samples P x K by label; "
                f"{config.method.name} samples a plain shuffle: set train.camera_groups=False"
            )
        return ShuffleSampler(
            len(data.train.images), config.train.batch_size, seed=config.seed, num_steps=steps
        )
    if config.train.camera_groups:
        return CameraGroupSampler(
            plan.sampler_labels,
            data.train.cameras,
            config.train.batch_size,
            config.train.num_instances,
            config.model.bn_group_size or config.train.batch_size,
            seed=config.seed,
            num_steps=steps,
        )
    return IdentitySampler(
        plan.sampler_labels,
        data.train.cameras,
        config.train.batch_size,
        config.train.num_instances,
        seed=config.seed,
        num_steps=steps,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, data: Data, log: Callable[[str], None]
) -> dict[str, Any]:
    """Trains `config.method` and returns the results dict of results.json."""
    start_time = time.time()
    data, domains = with_source(data)
    method: Method = get_method(config)
    config = method.configure(config, data.train.pids)
    mesh: Mesh = make_mesh(config.train.num_devices)
    replicated = NamedSharding(mesh, P())
    batch_size = config.train.batch_size
    batch_groups(config, mesh.size)  # a clear error before any work
    # A fixed number of steps ("iters") per epoch; default one pass.
    steps_per_epoch = config.train.steps_per_epoch or len(data.train.images) // batch_size
    total_steps = steps_per_epoch * config.train.epochs
    model = models.build_model(config.model, rngs=nnx.Rngs(config.seed))
    graphdef, params, batch_stats = models.split_model(model)
    tx = make_optimizer(config, steps_per_epoch, models.trainable_mask(model, params))
    del model

    # The training set goes to the devices once; steps and extraction read it there.
    arrays = jax.device_put(
        TrainArrays(
            images=data.train.images,
            cameras=np.asarray(data.train.cameras, np.int32),
            domains=domains,
        ),
        replicated,
    )
    current = {"variables": (params, batch_stats)}
    train_set = _train_set(config, graphdef, data, arrays, domains, lambda: current["variables"])
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        memory=method.init_memory(train_set),
        rng=jnp.asarray(_host_key(config.seed + 1)),
        nonfinite_step=jnp.full((), -1, jnp.int32),
        # Its own buffers: the step donates the state.
        ema=jax.tree.map(jnp.array, {"params": params, "batch_stats": batch_stats})
        if config.train.ema_decay
        else None,
    )
    # The memory's layout on the devices (Method.memory_specs); the rest
    # replicated. Through the host: in a multi-process run the state spans the
    # devices of every process.
    memory_specs = memory_partition(method, state.memory)
    state = place_state(jax.device_get(state), memory_specs, mesh)
    del params, batch_stats

    checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints)
    meta: dict[str, Any] = {"history": [], "best_map": -1.0, "initial": None}
    try:
        restored, restored_meta = checkpoints.resume(state, config.train.get("resume_from", 0), log)
    except BaseException:
        checkpoints.close()
        raise
    if restored is not None:
        state = place_state(restored, memory_specs, mesh)
        meta = restored_meta
        log(f"resumed from step {int(state.step)} of {total_steps}")
    # Unlabelled folders without data.eval_root have no query / gallery.
    evaluating = len(data.query.records) > 0
    writer = MetricWriter(workdir)
    # From here on SIGINT / SIGTERM stop at the next safe point (a checkpoint).
    stop = StopRequest()
    from tqdm.auto import tqdm

    try:
        if evaluating and meta["initial"] is None:
            meta["initial"] = evaluate_model(config, graphdef, *model_variables(state), data)
        if evaluating:
            log(format_metrics("before training", meta["initial"]))
        if stop.requested:  # during the initial evaluation: keep it
            checkpoints.save(checkpoints.latest, state, meta)
            raise TrainingInterrupted(
                f"stopped at step {int(state.step)}; run the same command to resume"
            )
        train_step = make_train_step(config, graphdef, tx, method, mesh, memory_specs)
        step = int(state.step)
        first_step = step
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            current["variables"] = model_variables(state)
            plan = method.start_epoch(epoch, train_set, state.memory, in_epoch > 0)
            if plan.memory is not None:
                state = state.replace(memory=place_memory(plan.memory, memory_specs, mesh))
            if plan.stats:
                writer.write(step, plan.stats)
            if plan.summary:
                log(plan.summary)
            if jax.process_index() == 0:
                for name, values in plan.arrays.items():
                    folder = os.path.join(workdir, name)
                    os.makedirs(folder, exist_ok=True)
                    np.save(os.path.join(folder, f"epoch_{epoch + 1:03d}.npy"), values)
            phase = phase_index(method, plan.phase)
            batches = _sampler(config, plan, data, domains, steps_per_epoch).epoch_batches(epoch)
            batches = put_epoch_batches(batches[:steps_per_epoch], mesh)
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
                state, metrics = train_step(state, arrays, batches, np.int32(i), phase)
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
            if evaluating and (epoch % config.train.eval_every == 0 or step == total_steps):
                result = evaluate_model(config, graphdef, *model_variables(state), data)
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
