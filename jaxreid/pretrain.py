"""Self-supervised person pre-training on unlabelled crops (`--mode=pretrain`;
SSL-KD, #52): a student and an EMA teacher, no clustering, no identities,
no cameras.

One compiled step (donated state): the uint8 batch -> a complete view
(flip, pad + crop: the teacher's) -> the ReID prior (jaxreid.reid_prior:
down/up-sampling, blur, random erasing, a horizontal occluder, then masked
feature cells) for the student's degraded view, and upper / lower-body
partial views -> teacher (eval mode, no gradient) and student (train mode)
-> the losses (jaxreid.pretrain_losses): distillation of the teacher's
centred, sharpened complete view into the student's degraded and partial
views through projection heads, and restoration of the teacher's feature
cells (ViT: patch tokens; CNN: map cells) from the student's masked and
degraded ones through a predictor -> optax on the backbone and the heads
-> the teacher follows the student by EMA.

The model's head (BN neck, its pooling) stays as built: the backbone learns,
so the pooled feature a method starts from is comparable with the
initialisation's. The checkpoint (orbax, checkpoints/latest) holds the
student at `params` / `batch_stats`, the teacher at `ema` and the heads
apart (`heads`, `ema_projector`), so `model.pretrained=WORKDIR` hands the
teacher to any method (jaxreid.models.pretrained.load_run_weights). Images
are decoded per batch on the host (a thread prefetches the next batch):
10^6 crops cost their file list, not their pixels.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxreid import augment, models, parallel, reid_prior
from jaxreid import pretrain_losses as losses
from jaxreid.checkpoints import Checkpoints
from jaxreid.data.datasets import DataError, Record, load_dataset
from jaxreid.data.images import decode_image
from jaxreid.data.samplers import ShuffleSampler
from jaxreid.models.heads import TokenMap
from jaxreid.models.vit import VisionTransformer
from jaxreid.run_io import MetricWriter, StopRequest, TrainingInterrupted
from jaxreid.step import make_optimizer, update_ema
from jaxreid.utils import UserError


def default_pretrain_config() -> ml_collections.ConfigDict:
    """The `pretrain` section: the prior, the heads and the losses. Defaults:
    DINO's temperatures and centre momentum, SSL-KD's views."""
    c = ml_collections.ConfigDict()
    c.teacher_momentum = 0.996  # EMA of the teacher (DINO's start value)
    c.center_momentum = 0.9
    c.student_temperature = 0.1
    c.teacher_temperature = 0.04
    c.projector_hidden = 512
    c.projector_bottleneck = 128
    c.prototypes = 1024  # K, the projector's output
    c.predictor_hidden = 512
    c.distill_weight = 1.0
    c.restore_weight = 1.0
    # Weight of the visible (but degraded) cells in the restoration, masked ones 1.
    c.detail_weight = 0.5
    c.variance_weight = 0.0  # VICReg's hinge on the student's embedding; 0 = off
    c.mask_ratio = 0.3  # of the feature grid's cells, hidden in the degraded view
    # The ReID prior on the student's complete view.
    c.down_factors = (0.25, 0.375, 0.5)
    c.down_prob = 0.5
    c.blur_sigma = (0.5, 2.0)  # pixels, uniform
    c.blur_prob = 0.5
    c.erasing_prob = 0.5  # random erasing with the augment section's area / aspect
    c.occluder_height = (0.1, 0.3)  # of the image height
    c.occluder_prob = 0.3
    # Partial views: the top / bottom fraction in this range, resized to
    # partial_height x data.height by data.width.
    c.partial_keep = (0.4, 0.6)
    c.partial_height = 0.5
    c.decode_threads = 4
    return c


def pretrain_problems(config: ml_collections.ConfigDict) -> list[str]:
    """'setting = value: fix' lines for --mode=pretrain (validate.py)."""
    from jaxreid.validate import _positive, number_problems

    if "pretrain" not in config:
        return [
            "config has no `pretrain` section: start the config from configs/pretrain_lite0.py, "
            "or add c.pretrain = jaxreid.pretrain.default_pretrain_config()"
        ]
    problems: list[str] = []
    _positive(problems, config, "train.epochs", "train.batch_size", "train.log_every")
    _positive(problems, config, "train.checkpoint_every_steps")
    problems += number_problems(
        config,
        ("optimizer.lr", 0, None, "()", "e.g. 3.5e-4"),
        ("pretrain.teacher_momentum", 0, 1, "[)", "0.99-0.996 is usual"),
        ("pretrain.center_momentum", 0, 1, "[)", "0.9 is usual"),
        ("pretrain.student_temperature", 0, None, "()", "0.1 is usual"),
        ("pretrain.teacher_temperature", 0, None, "()", "0.04-0.07 is usual"),
        ("pretrain.mask_ratio", 0, 1, "[)", "0.3 is usual"),
        ("pretrain.partial_height", 0, 1, "(]", "0.5: half the height"),
        ("pretrain.detail_weight", 0, None, "[)", "0.5"),
    )
    p = config.pretrain
    for key in ("partial_keep", "blur_sigma", "occluder_height"):
        low, high = p[key]
        if not 0 < low <= high or (key != "blur_sigma" and high > 1):
            problems.append(
                f"pretrain.{key} = {tuple(p[key])}: must be (low, high) with 0 < low <= high"
                + ("" if key == "blur_sigma" else " <= 1")
            )
    if any(not 0 < f < 1 for f in p.down_factors):
        problems.append(f"pretrain.down_factors = {tuple(p.down_factors)}: each in (0, 1)")
    if config.model.head not in ("bnneck", "fc", "scl"):
        problems.append(
            f"model.head = {config.model.head!r}: pretraining reads the head's pooled "
            "'pre_bn' feature; use bnneck, fc or scl"
        )
    batch, group = config.train.batch_size, config.model.bn_group_size
    if isinstance(batch, int) and group and batch % group:
        problems.append(f"model.bn_group_size = {group}: must divide train.batch_size = {batch}")
    if not config.data.root:
        problems.append("data.root is empty: set it to the crops' folder (several: joined by ':')")
    return problems


# ---------------------------------------------------------------- heads


def _dense(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    std = 1.0 / np.sqrt(fan_in)  # LeCun normal: unit-scale outputs for unit-scale inputs
    return {
        "kernel": jax.random.normal(key, (fan_in, fan_out), jnp.float32) * std,
        "bias": jnp.zeros((fan_out,), jnp.float32),
    }


def init_heads(key: jax.Array, embed: int, channels: int, p: ml_collections.ConfigDict) -> dict:
    """{"projector": MLP embed -> hidden -> bottleneck, then cosine against K
    prototypes; "predictor": MLP channels -> hidden -> channels per cell}."""
    k = jax.random.split(key, 6)
    projector = {
        "fc1": _dense(k[0], embed, p.projector_hidden),
        "fc2": _dense(k[1], p.projector_hidden, p.projector_hidden),
        "fc3": _dense(k[2], p.projector_hidden, p.projector_bottleneck),
        "prototypes": jax.random.normal(k[3], (p.projector_bottleneck, p.prototypes)),
    }
    predictor = {
        "fc1": _dense(k[4], channels, p.predictor_hidden),
        "fc2": _dense(k[5], p.predictor_hidden, channels),
    }
    return {"projector": projector, "predictor": predictor}


def _apply_dense(layer: dict, x: jax.Array) -> jax.Array:
    return x @ layer["kernel"] + layer["bias"]


def project(projector: dict, x: jax.Array) -> jax.Array:
    """(..., D) embeddings -> (..., K) logits: DINO's head (3-layer MLP, an
    L2-normalised bottleneck, weight-normalised prototypes)."""
    h = jax.nn.gelu(_apply_dense(projector["fc1"], x))
    h = jax.nn.gelu(_apply_dense(projector["fc2"], h))
    z = _apply_dense(projector["fc3"], h)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    w = projector["prototypes"]
    return z @ (w / jnp.maximum(jnp.linalg.norm(w, axis=0, keepdims=True), 1e-12))


def predict(predictor: dict, cells: jax.Array) -> jax.Array:
    """(..., C) feature cells -> (..., C) predicted teacher cells."""
    return _apply_dense(predictor["fc2"], jax.nn.gelu(_apply_dense(predictor["fc1"], cells)))


# ---------------------------------------------------------------- model


def forward(graphdef, params, batch_stats, images: jax.Array, train: bool, rng=None):
    """(pooled (B, D), grid (B, gh, gw, C), batch_stats): the backbone in
    `train` mode (its batch statistics updated), the head in eval mode, as
    built (its 'pre_bn': the pooled feature, or the head's projection)."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    if isinstance(model.backbone, VisionTransformer):
        features = model.backbone(images, train, rng=rng)
    else:
        features = model.backbone(images, train)
    pooled = model.head(features, False)["pre_bn"]
    grid = features.grid if isinstance(features, TokenMap) else features
    stats = nnx.state(model, nnx.BatchStat) if train else batch_stats
    return pooled.astype(jnp.float32), grid.astype(jnp.float32), stats


def backbone_mask(model: nnx.Module, params: Any) -> Any:
    """True for the backbone's trainable leaves; the head stays as built."""
    mask = models.trainable_mask(model, params)

    def in_backbone(path, trainable):
        return bool(trainable) and str(getattr(path[0], "key", path[0])) == "backbone"

    return jax.tree_util.tree_map_with_path(in_backbone, mask)


class PretrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any  # the student model's (load_run_weights reads ema first)
    batch_stats: Any
    heads: Any  # the student's projector and predictor
    opt_state: Any
    ema: Any  # the teacher model {"params", "batch_stats"}: what is handed over
    ema_projector: Any  # the teacher's projector
    center: jax.Array  # (K,) the teacher logits' centre
    rng: jax.Array  # raw uint32 key
    nonfinite_step: jax.Array  # first step with a NaN/inf loss (-1: none); not applied


# ---------------------------------------------------------------- the step


def student_views(key: jax.Array, images: jax.Array, config: ml_collections.ConfigDict, grid):
    """(clean, degraded, cells, partial): the teacher's complete view, the
    student's degraded and masked one, its (B, gh * gw) masked cells and the
    upper + lower-body views (2B, h', W) of one uint8 batch."""
    p, a = config.pretrain, config.augment
    k_view, k_down, k_blur, k_erase, k_occ, k_mask, k_up, k_low = jax.random.split(key, 8)
    options = augment.AugmentOptions(flip=bool(a.flip), pad=int(a.pad))
    clean = augment.augment_batch(k_view, images, options)
    x = reid_prior.down_up_sample(k_down, clean, tuple(p.down_factors), p.down_prob)
    x = reid_prior.gaussian_blur(k_blur, x, tuple(p.blur_sigma), p.blur_prob)
    fill = augment.IMAGENET_MEAN
    x = augment.random_erasing(
        k_erase, x, p.erasing_prob, tuple(a.erasing_area), float(a.erasing_min_aspect), fill
    )
    x = reid_prior.horizontal_occluder(k_occ, x, tuple(p.occluder_height), p.occluder_prob, fill)
    b, h, w, _ = images.shape
    cells, pixels = reid_prior.cell_mask(k_mask, b, grid, (h, w), p.mask_ratio)
    degraded = jnp.where(pixels[..., None], jnp.asarray(fill, x.dtype), x)
    shape = (max(1, round(h * p.partial_height)), w)
    keep = tuple(p.partial_keep)
    upper = reid_prior.partial_view(k_up, clean, False, keep, shape)
    lower = reid_prior.partial_view(k_low, clean, True, keep, shape)
    return clean, degraded, cells, jnp.concatenate([upper, lower])


def make_pretrain_step(
    config: ml_collections.ConfigDict, graphdef, tx, mesh: Mesh, grid: tuple[int, int]
) -> Callable:
    """The compiled step: (state, uint8 images (B, H, W, 3) sharded on the
    batch) -> (state, metrics)."""
    p = config.pretrain
    replicated = NamedSharding(mesh, P())

    def step_fn(state: PretrainState, images: jax.Array):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_views, k_model = jax.random.split(key)
        clean, degraded, cells, partial = student_views(k_views, images, config, grid)
        b = images.shape[0]
        t_pooled, t_grid, _ = forward(
            graphdef, state.ema["params"], state.ema["batch_stats"], clean, False
        )
        t_logits = project(state.ema_projector, t_pooled)

        def loss_fn(trainable):
            params, heads = trainable["model"], trainable["heads"]
            k1, k2 = jax.random.split(k_model)
            s_pooled, s_grid, stats = forward(
                graphdef, params, state.batch_stats, degraded, True, k1
            )
            p_pooled, _, stats = forward(graphdef, params, stats, partial, True, k2)
            views = jnp.stack([s_pooled, p_pooled[:b], p_pooled[b:]])
            distill = losses.distillation_loss(
                project(heads["projector"], views),
                t_logits,
                state.center,
                p.student_temperature,
                p.teacher_temperature,
            )
            n, c = s_grid.shape[1] * s_grid.shape[2], s_grid.shape[-1]
            predicted = predict(heads["predictor"], s_grid.reshape(b, n, c))
            weights = cells + p.detail_weight * (1.0 - cells)
            restore = losses.restoration_loss(predicted, t_grid.reshape(b, n, c), weights)
            variance = losses.variance_loss(s_pooled) if p.variance_weight else jnp.float32(0)
            total = (
                p.distill_weight * distill + p.restore_weight * restore
            ) + p.variance_weight * variance
            metrics = {"distill": distill, "restore": restore, "variance": variance}
            return total, (stats, s_pooled, metrics)

        trainable = {"model": state.params, "heads": state.heads}
        (loss, (stats, s_pooled, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable
        )
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss)

        def keep(a, b):
            return jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)

        params = keep(new["model"], state.params)
        heads = keep(new["heads"], state.heads)
        stats = keep(stats, state.batch_stats)
        m = p.teacher_momentum
        ema = update_ema(state.ema, {"params": params, "batch_stats": stats}, m)
        ema_projector = update_ema(state.ema_projector, heads["projector"], m)
        center = keep(losses.update_center(state.center, t_logits, p.center_momentum), state.center)
        targets = losses.teacher_targets(t_logits, state.center, p.teacher_temperature)
        entropy = -jnp.mean(jnp.sum(targets * jnp.log(jnp.maximum(targets, 1e-12)), axis=-1))
        metrics = {
            "loss": loss,
            **metrics,
            "grad_norm": optax.global_norm(grads),
            # The collapse monitor: a collapsing model's spread and rank fall.
            "teacher_std": losses.embedding_std(t_pooled),
            "teacher_rank": losses.effective_rank(t_pooled),
            "student_std": losses.embedding_std(s_pooled),
            "student_rank": losses.effective_rank(s_pooled),
            "target_entropy": entropy,
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=stats,
            heads=heads,
            opt_state=keep(opt_state, state.opt_state),
            ema=keep(ema, state.ema),
            ema_projector=keep(ema_projector, state.ema_projector),
            center=center,
            nonfinite_step=jnp.where(
                (state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step
            ),
        )
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=(0,), out_shardings=(replicated, replicated))


# ---------------------------------------------------------------- data


def read_records(config: ml_collections.ConfigDict, log: Callable[[str], None]) -> list[Record]:
    """The training images of every root of `data.root` (several joined by
    os.pathsep, ':'), each read as `data.dataset` (a "folder" of crops at any
    depth, or a labelled layout whose labels are not read)."""
    roots = [r for r in config.data.root.split(os.pathsep) if r]
    records: list[Record] = []
    for root in roots:
        dataset = load_dataset(config.data.dataset, root, "none", log)
        found = dataset.split("train")
        log(f"{dataset.root}: {len(found):,} images")
        records += found
    return [Record(path=r.path, pid=-1, camera=0, index=i) for i, r in enumerate(records)]


class BatchLoader:
    """Decodes a batch's images on the host (threads; PIL releases the GIL)
    while the previous step runs; each process decodes its own slice. A file
    that cannot be decoded becomes a black image and is counted; more than
    `max_bad_fraction` of the decoded ones (and more than 10) stops the run."""

    def __init__(self, records, height: int, width: int, threads: int, max_bad_fraction: float):
        self.records, self.height, self.width = records, height, width
        self.max_bad_fraction = max_bad_fraction
        self.decoded = self.bad = 0
        self.first_bad = ""
        self._pool = ThreadPoolExecutor(max(1, threads))
        self._ahead = ThreadPoolExecutor(1)

    def _one(self, index: int) -> np.ndarray:
        try:
            return decode_image(self.records[index].path, self.height, self.width)[0]
        except DataError as e:
            self.bad += 1
            self.first_bad = self.first_bad or str(e)
            return np.zeros((self.height, self.width, 3), np.uint8)

    def _decode(self, indices: np.ndarray) -> np.ndarray:
        images = np.stack(list(self._pool.map(self._one, indices.tolist())))
        self.decoded += len(indices)
        if self.bad > max(10, self.max_bad_fraction * self.decoded):
            raise DataError(
                f"{self.bad} of {self.decoded} images could not be decoded (more than "
                f"data.max_bad_fraction {self.max_bad_fraction:.1%}); first: {self.first_bad}"
            )
        return images

    def submit(self, indices: np.ndarray):
        return self._ahead.submit(self._decode, indices)

    def close(self) -> None:
        self._ahead.shutdown(wait=True)
        self._pool.shutdown(wait=True)


def put_batch(images: np.ndarray, batch: int, mesh: Mesh) -> jax.Array:
    """This process's slice of the batch -> the global batch, sharded on it."""
    shape = (batch, *images.shape[1:])
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, P(parallel.AXIS)), images, shape
    )


def _process_slice(batch: np.ndarray) -> np.ndarray:
    per = len(batch) // jax.process_count()
    return batch[jax.process_index() * per : (jax.process_index() + 1) * per]


# ---------------------------------------------------------------- the loop


def init_state(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """(graphdef, tx, state, grid): the model (config.model, its `pretrained`
    weights), the heads, the optimizer over the backbone and the heads, the
    teacher a copy of the student."""
    model = models.build_model(config.model, rngs=nnx.Rngs(config.seed))
    graphdef, params, batch_stats = models.split_model(model)
    h, w = config.data.height, config.data.width
    probe = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    pooled, grid, _ = jax.eval_shape(
        lambda x: forward(graphdef, params, batch_stats, x, False), probe
    )
    key_heads, key_state = jax.random.split(jax.random.key(config.seed + 1))
    heads = init_heads(key_heads, pooled.shape[-1], grid.shape[-1], config.pretrain)
    trainable = {
        "model": backbone_mask(model, params),
        "heads": jax.tree.map(lambda _: True, heads),
    }
    tx = make_optimizer(config, steps_per_epoch, trainable)
    del model

    def copy(tree):  # own buffers: the step donates the state
        return jax.tree.map(jnp.array, tree)

    state = PretrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        heads=heads,
        opt_state=tx.init({"model": params, "heads": heads}),
        ema=copy({"params": params, "batch_stats": batch_stats}),
        ema_projector=copy(heads["projector"]),
        center=jnp.zeros((config.pretrain.prototypes,), jnp.float32),
        rng=jax.random.key_data(key_state),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )
    return graphdef, tx, state, (grid.shape[1], grid.shape[2])


def pretrain(
    config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """Pre-trains config.model on the unlabelled images of config.data.root;
    returns the results dict of results.json. The same command resumes."""
    start_time = time.time()
    records = read_records(config, log)
    batch = config.train.batch_size
    if len(records) < batch:
        raise UserError(
            f"{len(records)} images but train.batch_size is {batch}: lower the batch size"
        )
    steps_per_epoch = config.train.steps_per_epoch or len(records) // batch
    total_steps = steps_per_epoch * config.train.epochs
    mesh = parallel.make_mesh(config.train.num_devices)
    if batch % mesh.size:
        raise UserError(
            f"train.batch_size {batch} does not split evenly over {mesh.size} devices: make it "
            "a multiple, or set train.num_devices"
        )
    graphdef, tx, state, grid = init_state(config, steps_per_epoch)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(jax.device_get(state), replicated)
    checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints)
    try:
        restored, meta = checkpoints.resume(state, config.train.get("resume_from", 0), log)
    except BaseException:
        checkpoints.close()
        raise
    if restored is not None:
        state = jax.device_put(restored, replicated)
        log(f"resumed from step {int(state.step)} of {total_steps}")
    meta = meta or {"images": len(records)}
    log(
        f"pretraining {config.model.backbone} on {len(records):,} images: {total_steps} steps "
        f"of {batch}, feature grid {grid[0]}x{grid[1]}"
    )
    train_step = make_pretrain_step(config, graphdef, tx, mesh, grid)
    loader = BatchLoader(
        records,
        config.data.height,
        config.data.width,
        config.pretrain.decode_threads,
        config.data.max_bad_fraction,
    )
    writer = MetricWriter(workdir)
    stop = StopRequest()
    from tqdm.auto import tqdm

    step = first_step = int(state.step)
    last: dict[str, float] = {}
    try:
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            sampler = ShuffleSampler(
                len(records), batch, seed=config.seed, num_steps=steps_per_epoch
            )
            batches = sampler.epoch_batches(epoch)
            bar = tqdm(
                total=steps_per_epoch,
                initial=in_epoch,
                desc=f"pretrain epoch {epoch + 1}",
                unit="step",
                disable=None,
                file=sys.stderr,
            )
            pending = loader.submit(_process_slice(batches[in_epoch]))
            tick, tick_step = time.time(), step
            for i in range(in_epoch, steps_per_epoch):
                budget = config.train.stop_after_steps
                if stop.requested or (budget and step - first_step >= budget):
                    _check_finite(state, checkpoints)
                    checkpoints.save(checkpoints.latest, state, meta)
                    raise TrainingInterrupted(
                        f"stopped at step {step}; run the same command to resume"
                    )
                images = pending.result()
                if i + 1 < steps_per_epoch:
                    pending = loader.submit(_process_slice(batches[i + 1]))
                state, metrics = train_step(state, put_batch(images, batch, mesh))
                step += 1
                end = i == steps_per_epoch - 1
                if step % config.train.log_every == 0 or end:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    _check_finite(state, checkpoints)
                    rate = (step - tick_step) * batch / max(time.time() - tick, 1e-9)
                    writer.write(step, {**last, "images_per_s": rate, "epoch": epoch})
                    log(
                        f"step {step}/{total_steps} loss {last['loss']:.4f} (distill "
                        f"{last['distill']:.3f} restore {last['restore']:.3f}) teacher std "
                        f"{last['teacher_std']:.4f} rank {last['teacher_rank']:.1f} "
                        f"{rate:.1f} img/s"
                    )
                    tick, tick_step = time.time(), step
                bar.update(1)
                if step % config.train.checkpoint_every_steps == 0 and not end:
                    _check_finite(state, checkpoints)
                    checkpoints.save(checkpoints.latest, state, meta)
            bar.close()
            _check_finite(state, checkpoints)
            checkpoints.save(checkpoints.latest, state, meta)
    finally:
        stop.restore()
        writer.close()
        loader.close()
        checkpoints.close()
    if loader.bad:
        log(f"skipped {loader.bad} unreadable image(s) (black); first: {loader.first_bad}")
    return {
        "steps": total_steps,
        "images": len(records),
        "final_metrics": last,
        "bad_images": loader.bad,
        "train_wall_time_s": time.time() - start_time,
    }


def _check_finite(state: PretrainState, checkpoints: Checkpoints) -> None:
    bad = int(state.nonfinite_step)
    if bad >= 0:
        raise FloatingPointError(
            f"the loss became NaN or inf at step {bad}; that step and the ones after it were "
            f"not applied (last checkpoint: step {checkpoints.latest.latest_step()}). Lower "
            "optimizer.lr or check the data."
        )
