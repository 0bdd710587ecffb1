"""The evaluation protocol of a trained model: extract query and gallery in
eval mode, rank with the global cosine distance (and SCL's distance for models
with stripes), Market-1501 mAP / CMC, the printed table and pictures."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxreid import evaluate, models


@functools.lru_cache(maxsize=16)
def eval_apply_fn(graphdef) -> Callable:
    """(variables, float images) -> outputs in eval mode, for extraction.
    One function per model structure (graphdefs hash by structure): the
    extraction's jit is keyed on it, so a new function per call would
    compile the forward again at every evaluation. An optional
    variables["camera"] (a scalar) is every image's camera, for a model with
    a camera embedding."""

    def apply(variables, images):
        camera = variables.get("camera")
        cameras = None if camera is None else jnp.full(images.shape[:1], camera, jnp.int32)
        outputs, _ = models.apply_model(
            graphdef,
            variables["params"],
            variables["batch_stats"],
            images,
            train=False,
            cameras=cameras,
        )
        return outputs

    return apply


def extract(
    graphdef,
    params,
    batch_stats,
    images,
    batch_size: int,
    flip: bool = False,
    camera: int | None = None,
):
    """Eval-mode outputs of `images` (host uint8, or the device-resident
    training images) as host arrays; `camera`: all the images' camera, for a
    model with a camera embedding."""
    variables = {"params": params, "batch_stats": batch_stats}
    if camera is not None:
        variables["camera"] = np.int32(camera)
    return evaluate.extract_features(
        eval_apply_fn(graphdef), images, batch_size, flip=flip, params=variables
    )


def uses_cameras(config: ml_collections.ConfigDict) -> bool:
    """Whether the model's forward takes the images' cameras (a ViT's camera
    embedding): its extraction then runs camera by camera."""
    return config.model.backbone.startswith("vit_") and config.model.get("camera_embedding", 0) > 0


def _check_cameras(config: ml_collections.ConfigDict, cameras) -> None:
    """A camera id beyond the embedding's rows would read its last row (jax
    clamps an out-of-range gather): refused, naming the setting."""
    from jaxreid.utils import UserError

    rows = int(config.model.camera_embedding)
    largest = int(np.max(cameras, initial=-1))
    if largest >= rows:
        raise UserError(
            f"model.camera_embedding = {rows}: the images have camera ids up to {largest} "
            f"(0-based); set it to at least {largest + 1}, the dataset's number of cameras"
        )


def _by_camera(extract_part: Callable, images, cameras) -> dict[str, np.ndarray]:
    """`extract_part(camera, images)` of each camera's images, reassembled in
    the order of `images`."""
    cameras = np.asarray(cameras)
    out: dict[str, np.ndarray] = {}
    for camera in np.unique(cameras):
        rows = np.flatnonzero(cameras == camera)
        part = extract_part(int(camera), images[rows])
        for key, value in part.items():
            if key not in out:
                out[key] = np.empty((len(cameras),) + value.shape[1:], value.dtype)
            out[key][rows] = value
    return out


def _extract_by_camera_bn(
    config: ml_collections.ConfigDict,
    graphdef,
    params,
    batch_stats,
    images,
    cameras,
    camera_bn: bool,
    flip: bool = False,
) -> dict[str, np.ndarray]:
    """Eval-mode outputs of `images`; with `camera_bn` each camera's images use
    batch-norm statistics of that camera's images among them. A model with a
    camera embedding gets each image's camera (`cameras`; None: the mean
    camera embedding)."""

    def extract_with(stats, part):
        return extract(graphdef, params, stats, part, config.eval.batch_size, flip)

    if cameras is not None and uses_cameras(config) and not camera_bn:
        # (camera_bn with a camera embedding is refused by model_problems.)
        _check_cameras(config, cameras)

        def extract_camera(camera, part):
            return extract(
                graphdef, params, batch_stats, part, config.eval.batch_size, flip, camera
            )

        return _by_camera(extract_camera, images, cameras)
    if not camera_bn:
        return extract_with(batch_stats, images)
    from jaxreid.evaluate.camera_bn import camera_batch_stats, extract_by_camera

    stats = camera_batch_stats(
        graphdef,
        params,
        batch_stats,
        images,
        cameras,
        batch_size=config.train.batch_size,
        seed=config.seed,
    )
    return extract_by_camera(extract_with, batch_stats, images, cameras, stats)


def extract_training_set(
    config: ml_collections.ConfigDict, graphdef, params, batch_stats, images, cameras
) -> dict[str, np.ndarray]:
    """Eval-mode outputs of the training images, as the methods cluster them:
    with config.cluster.camera_bn each camera's images use batch-norm statistics
    of that camera's training images."""
    return _extract_by_camera_bn(
        config, graphdef, params, batch_stats, images, cameras, config.cluster.camera_bn
    )


def output_shapes(graphdef, params, batch_stats, height: int, width: int) -> dict[str, tuple]:
    """Per-sample shapes of the model's eval outputs (traced, nothing computed)."""
    image = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    out = jax.eval_shape(
        eval_apply_fn(graphdef), {"params": params, "batch_stats": batch_stats}, image
    )
    return {k: v.shape[1:] for k, v in out.items()}


def query_gallery_features(
    config: ml_collections.ConfigDict, graphdef, params, batch_stats, data
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Model outputs of the query and gallery images (eval mode, config.eval.flip;
    with config.eval.camera_bn each camera's images use batch-norm statistics of
    that camera's query and gallery images together)."""

    if not config.eval.camera_bn:
        return tuple(
            _extract_by_camera_bn(
                config,
                graphdef,
                params,
                batch_stats,
                split.images,
                split.cameras if uses_cameras(config) else None,
                False,
                config.eval.flip,
            )
            for split in (data.query, data.gallery)
        )
    both = _extract_by_camera_bn(
        config,
        graphdef,
        params,
        batch_stats,
        np.concatenate([data.query.images, data.gallery.images]),
        np.concatenate([data.query.cameras, data.gallery.cameras]),
        True,
        config.eval.flip,
    )
    n = len(data.query.images)
    return {k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()}


def evaluate_model(
    config: ml_collections.ConfigDict, graphdef, params, batch_stats, data
) -> dict[str, Any]:
    """Extracts query / gallery features and evaluates them (`evaluate_features`)."""
    q, g = query_gallery_features(config, graphdef, params, batch_stats, data)
    return evaluate_features(config, q, g, data)


def evaluate_features(
    config: ml_collections.ConfigDict,
    q: dict[str, np.ndarray],
    g: dict[str, np.ndarray],
    data,
) -> dict[str, Any]:
    """Plain protocol (global cosine) and, for models with stripes, the SCL
    distance; returns {"plain": metrics, "scl": metrics} (no arrays)."""
    labels = (data.query.pids, data.gallery.pids, data.query.cameras, data.gallery.cameras)
    results = {}
    if config.eval.rerank:
        from jaxreid.pseudo_labels.kreciprocal import k_reciprocal_rerank

        distance = k_reciprocal_rerank(q["global"], g["global"])
    else:
        distance = evaluate.cosine_distance(q["global"], g["global"])
    results["plain"] = evaluate.evaluate_ranking(distance, *labels)
    if config.eval.camera_affinity:
        if config.eval.rerank:
            # The camera-aware similarity in the neighbour sets too, not only added after.
            distance = k_reciprocal_rerank(
                q["global"],
                g["global"],
                cameras=np.concatenate([data.query.cameras, data.gallery.cameras]),
                camera_affinity=config.eval.camera_affinity,
            )
        else:
            distance = distance + config.eval.camera_affinity * _camera_mismatch(
                q["global"], g["global"], data
            )
        results["affinity"] = evaluate.evaluate_ranking(distance, *labels)
    if config.eval.camera_centering:
        results["centred"] = evaluate.evaluate_ranking(
            _camera_centred_distance(q["global"], g["global"], data), *labels
        )
    if "stripes" in q:
        from jaxreid.methods.scl import scl_settings

        distance = evaluate.scl_distance(
            q["global"],
            g["global"],
            q["stripes"],
            g["stripes"],
            data.query.cameras,
            data.gallery.cameras,
            # The SCL distance's weights: the method's, else SCL's defaults.
            lam_g=config.method.get("lam_g", scl_settings()["lam_g"]),
            lam_c=config.method.get("lam_c", scl_settings()["lam_c"]),
        )
        results["scl"] = evaluate.evaluate_ranking(distance, *labels)
    for metrics in results.values():
        metrics.pop("cmc", None)
    return {name: {k: float(v) for k, v in m.items()} for name, m in results.items()}


def _camera_mismatch(q: np.ndarray, g: np.ndarray, data) -> np.ndarray:
    """(Q, G) 1 - A[c_q, c_g], the camera affinity A estimated on the query and
    gallery features together (cameras only, never identities): in a network
    where a person passes a few cameras, a gallery image from a camera that
    shares no people with the query's is ranked down."""
    from jaxreid.pseudo_labels.camera_affinity import estimate_affinity, per_camera_neighbors
    from jaxreid.utils import l2_normalize

    features = l2_normalize(np.concatenate([q, g]).astype(np.float32))
    cameras = np.concatenate([data.query.cameras, data.gallery.cameras])
    ids, sims, idx = per_camera_neighbors(features, cameras, 1)
    mismatch = 1.0 - estimate_affinity(cameras, ids, sims, idx)
    index = np.searchsorted(ids, cameras)
    return mismatch[index[: len(q)]][:, index[len(q) :]].astype(np.float32)


def _camera_centred_distance(q: np.ndarray, g: np.ndarray, data) -> np.ndarray:
    """Cosine distance after removing each camera's mean unit feature, the mean
    taken over the camera's query and gallery images together (camera-wise
    normalisation at test time; uses cameras, never identities)."""
    from jaxreid.pseudo_labels.clustering import camera_centered

    cameras = np.concatenate([data.query.cameras, data.gallery.cameras])
    both = camera_centered(np.concatenate([q, g]), cameras)
    return evaluate.cosine_distance(both[: len(q)], both[len(q) :])


def format_metrics(title: str, results: dict[str, dict[str, float]]) -> str:
    lines = [f"{title}:", f"  {'distance':<8} {'mAP':>6} {'rank1':>6} {'rank5':>6} {'rank10':>6}"]
    for name, m in results.items():
        lines.append(
            f"  {name:<8} {100 * m['mAP']:6.1f} {100 * m['rank1']:6.1f} "
            f"{100 * m['rank5']:6.1f} {100 * m['rank10']:6.1f}"
        )
    return "\n".join(lines)


def write_plots(config, q, g, data, workdir: str, log) -> None:
    """Ranked-list grid and CMC curve from the features just evaluated."""
    from jaxreid.evaluate import plots

    distance = evaluate.cosine_distance(q["global"], g["global"])
    rng = np.random.default_rng(config.seed)
    count = min(config.eval.num_plot_queries, len(data.query.records))
    chosen = np.sort(rng.choice(len(data.query.records), count, replace=False))
    grid = os.path.join(workdir, "ranked_lists.png")
    plots.ranked_list_grid(
        distance,
        data.query.paths,
        data.gallery.paths,
        data.query.pids,
        data.gallery.pids,
        data.query.cameras,
        data.gallery.cameras,
        chosen,
        grid,
    )
    metrics = evaluate.evaluate_ranking(
        distance,
        data.query.pids,
        data.gallery.pids,
        data.query.cameras,
        data.gallery.cameras,
        max_rank=50,
    )
    curve = os.path.join(workdir, "cmc.png")
    plots.cmc_curve_plot({"global cosine": metrics["cmc"]}, curve)
    log(f"wrote {grid} and {curve}")


def run_eval(config: ml_collections.ConfigDict, workdir: str, data, log) -> dict:
    """--mode=eval: a checkpoint (or the initial model) on query/gallery."""
    from jaxreid.checkpoints import load_model_for_eval
    from jaxreid.utils import UserError

    path = config.eval.checkpoint or os.path.join(workdir, "checkpoints", "latest")
    if config.eval.checkpoint and not os.path.isdir(path):
        raise UserError(
            f"checkpoint folder {path!r} does not exist; check --config.eval.checkpoint"
        )
    graphdef, params, batch_stats, source = load_model_for_eval(config, path)
    log(f"evaluating the {source}")
    q, g = query_gallery_features(config, graphdef, params, batch_stats, data)
    results = evaluate_features(config, q, g, data)
    log(format_metrics("evaluation", results))
    if config.eval.plots:
        write_plots(config, q, g, data, workdir, log)
    return {"eval": results, "source": source}
