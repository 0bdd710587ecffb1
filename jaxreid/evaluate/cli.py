"""`python -m jaxreid.evaluate --features F.npz`: metrics of saved features.

F.npz holds query_features (Q, D), gallery_features (G, D), query_pids,
gallery_pids, query_cams, gallery_cams (1-d integers) and, for
`--distance scl`, query_stripes / gallery_stripes (N, P, D/P).

Distances: cosine (default) L2-normalises the features first; euclidean and
scl use them as stored (models output L2-normalised features); `--rerank`
L2-normalises the global features and applies k-reciprocal re-ranking
(jaxreid.pseudo_labels.kreciprocal), which builds its own distance, so it goes with the
default `--distance cosine` only.

Where query_model / gallery_model record which model made each side
(jaxreid.inference.record_array), features of two models are refused; a file
without them is evaluated with a one-line note.

Bad input ends with one line on stderr naming the file or setting and the fix,
exit 2: NaN / inf or zero-norm feature rows (counted), counts < 1 (--max-rank,
--k1, --k2, --max-block-bytes), weights that are not finite, --lambda-value
outside [0, 1], distances that overflow, no query with a match.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from collections.abc import Sequence

import numpy as np
from absl import flags

from jaxreid.command_line import parse
from jaxreid.evaluate.distances import (
    DEFAULT_MAX_BLOCK_BYTES,
    cosine_distance,
    euclidean_distance,
    scl_distance,
)
from jaxreid.evaluate.metrics import evaluate_ranking
from jaxreid.utils import NORM_EPS, UserError, l2_normalize

REQUIRED_KEYS = (
    "query_features",
    "gallery_features",
    "query_pids",
    "gallery_pids",
    "query_cams",
    "gallery_cams",
)
STRIPE_KEYS = ("query_stripes", "gallery_stripes")
# Which model made each side (jaxreid.inference.record_array), where recorded.
RECORD_KEYS = ("query_model", "gallery_model")
JSON_KEYS = ("mAP", "rank1", "rank5", "rank10", "num_queries", "num_valid_queries")


class InputError(UserError):
    """A problem with the user's input, reported as one line (no traceback)."""


PROG = "python -m jaxreid.evaluate"


def define_flags(fv: flags.FlagValues) -> None:
    """mAP / CMC (Market-1501 protocol) of saved query and gallery features."""
    flags.DEFINE_string(
        "features", None, "npz with query_/gallery_ arrays", flag_values=fv, required=True
    )
    flags.DEFINE_enum(
        "distance", "cosine", ["cosine", "euclidean", "scl"], "feature distance", flag_values=fv
    )
    flags.DEFINE_float("lam_g", 0.5, "scl: weight of the global term", flag_values=fv)
    flags.DEFINE_float("lam_c", 0.05, "scl: same-camera penalty", flag_values=fv)
    flags.DEFINE_bool("rerank", False, "k-reciprocal re-ranking", flag_values=fv)
    flags.DEFINE_integer("k1", 20, "re-ranking: k1", flag_values=fv)
    flags.DEFINE_integer("k2", 6, "re-ranking: k2", flag_values=fv)
    flags.DEFINE_float(
        "lambda_value", 0.3, "re-ranking: weight of the original distance", flag_values=fv
    )
    flags.DEFINE_integer("max_rank", 10, "length of the CMC curve", flag_values=fv)
    flags.DEFINE_integer(
        "max_block_bytes", DEFAULT_MAX_BLOCK_BYTES, "memory of a distance block", flag_values=fv
    )
    flags.DEFINE_bool("json", False, "print one JSON object", flag_values=fv)


def open_archive(path: str, written_by: str = "feature extraction") -> np.lib.npyio.NpzFile:
    """np.load of an .npz (no pickles); InputError with a one-line reason for a
    missing file, a folder, another format or a single .npy array."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file; pass the .npz written by {written_by}")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory; pass the .npz file inside it")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(
            f"{path}: not a readable .npz archive ({type(e).__name__}); write it with {written_by}"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(
            f"{path}: holds a single .npy array, not an .npz; write it with {written_by}"
        )
    return archive


def load_features(path: str, need_stripes: bool) -> dict[str, np.ndarray]:
    """Reads and validates the npz; raises InputError with a one-line reason."""
    with open_archive(path, "numpy.savez") as archive:
        wanted = REQUIRED_KEYS + (STRIPE_KEYS if need_stripes else ())
        missing = [k for k in wanted if k not in archive.files]
        if missing:
            if need_stripes and set(missing) <= set(STRIPE_KEYS):
                raise InputError(
                    f"{path}: --distance scl needs {', '.join(missing)} (N, P, D/P); "
                    "save the stripe features or use --distance cosine"
                )
            raise InputError(
                f"{path}: missing keys {', '.join(missing)}; the npz needs "
                f"{', '.join(REQUIRED_KEYS)}"
            )
        try:
            data = {k: archive[k] for k in wanted + RECORD_KEYS if k in archive.files}
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise InputError(
                f"{path}: an array cannot be read ({e}); re-save with numpy.savez"
            ) from None
    _validate(path, data, need_stripes)
    return data


def _validate(path: str, data: dict[str, np.ndarray], need_stripes: bool) -> None:
    feature_ndims = {"query_features": 2, "gallery_features": 2}
    if need_stripes:
        feature_ndims |= {"query_stripes": 3, "gallery_stripes": 3}
    for key, ndim in feature_ndims.items():
        a = data[key]
        if a.ndim != ndim:
            raise InputError(f"{path}: {key} must be {ndim}-d, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise InputError(f"{path}: {key} must be floating point, got {a.dtype}")
    for key in REQUIRED_KEYS[2:]:
        a = data[key]
        if a.ndim != 1:
            raise InputError(f"{path}: {key} must be 1-d, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"{path}: {key} must be integers, got {a.dtype}")
    for side in ("query", "gallery"):
        keys = [f"{side}_features", f"{side}_pids", f"{side}_cams"]
        keys += [f"{side}_stripes"] if need_stripes else []
        lengths = {k: len(data[k]) for k in keys}
        if len(set(lengths.values())) != 1:
            listed = ", ".join(f"{k}={n}" for k, n in lengths.items())
            raise InputError(
                f"{path}: {side} arrays differ in length ({listed}); one row per image"
            )
    feature_keys = ("features", "stripes") if need_stripes else ("features",)
    for name in feature_keys:
        q, g = data[f"query_{name}"], data[f"gallery_{name}"]
        if q.shape[1:] != g.shape[1:]:
            raise InputError(
                f"{path}: query_{name} {q.shape} and gallery_{name} {g.shape} differ in "
                "feature shape; extract both with the same model"
            )
    for side in ("query", "gallery"):
        if len(data[f"{side}_features"]) == 0:
            raise InputError(f"{path}: no {side} rows; the npz needs at least one of each")
    for key in feature_ndims:
        a = data[key]
        if 0 in a.shape[1:]:
            raise InputError(
                f"{path}: {key} has shape {a.shape}: features of width 0; re-extract them"
            )
        rows = a.reshape(len(a), -1)
        bad_rows = int((~np.isfinite(rows)).any(axis=1).sum())
        if bad_rows:
            raise InputError(
                f"{path}: {key} has {bad_rows} of {len(a)} rows with NaN/inf; "
                "re-extract (check the model for divergence)"
            )
        zero_rows = int((np.linalg.norm(rows.astype(np.float64), axis=1) <= NORM_EPS).sum())
        if zero_rows:
            raise InputError(
                f"{path}: {key} has {zero_rows} of {len(a)} rows of zero norm (a model "
                "outputs unit rows); re-extract them (check the images and the model)"
            )


# Settings that must be counts >= 1 and finite weights, with what they are.
COUNT_FLAGS = {
    "max_rank": "the length of the CMC curve",
    "k1": "the re-ranking neighbourhood",
    "k2": "the re-ranking query expansion",
    "max_block_bytes": "the memory of a distance block",
}
WEIGHT_FLAGS = ("lam_g", "lam_c", "lambda_value")


def check_settings(args: flags.FlagValues) -> None:
    """InputError naming the first setting that cannot give a meaningful result."""
    if args.rerank and args.distance != "cosine":
        raise InputError(
            f"{args.features}: --rerank builds its own distance from the global "
            f"features; drop --distance {args.distance} or --rerank"
        )
    for name, what in COUNT_FLAGS.items():
        value = getattr(args, name)
        if value < 1:
            default = args[name].default
            raise InputError(
                f"--{name.replace('_', '-')} {value}: {what} must be >= 1 (default {default})"
            )
    for name in WEIGHT_FLAGS:
        value = getattr(args, name)
        if not np.isfinite(value):
            raise InputError(
                f"--{name.replace('_', '-')} {value}: must be a finite number "
                f"(default {args[name].default})"
            )
    if not 0 <= args.lambda_value <= 1:
        raise InputError(
            f"--lambda-value {args.lambda_value}: the weight of the original distance in "
            "re-ranking must be in [0, 1] (default 0.3)"
        )


def compute_distance(args: flags.FlagValues, data: dict[str, np.ndarray]) -> np.ndarray:
    qf, gf = data["query_features"], data["gallery_features"]
    if args.rerank:
        from jaxreid.pseudo_labels.kreciprocal import (
            k_reciprocal_rerank,  # faiss: imported on demand
        )

        return np.asarray(
            k_reciprocal_rerank(
                l2_normalize(qf),
                l2_normalize(gf),
                k1=args.k1,
                k2=args.k2,
                lambda_value=args.lambda_value,
            ),
            dtype=np.float32,
        )
    if args.distance == "cosine":
        return cosine_distance(qf, gf, max_block_bytes=args.max_block_bytes)
    if args.distance == "euclidean":
        return euclidean_distance(qf, gf, max_block_bytes=args.max_block_bytes)
    return scl_distance(
        qf,
        gf,
        data["query_stripes"],
        data["gallery_stripes"],
        data["query_cams"],
        data["gallery_cams"],
        lam_g=args.lam_g,
        lam_c=args.lam_c,
        max_block_bytes=args.max_block_bytes,
    )


def _table(path: str, args: flags.FlagValues, result: dict) -> str:
    method = (
        f"re-ranked (k1={args.k1}, k2={args.k2}, lambda={args.lambda_value})"
        if args.rerank
        else args.distance
    )
    if args.distance == "scl" and not args.rerank:
        method += f" (lam_g={args.lam_g}, lam_c={args.lam_c})"
    lines = [
        f"{path}: {result['num_queries']} queries, distance {method}",
        f"  {'metric':<8} {'value':>7}",
    ]
    for label, key in (
        ("mAP", "mAP"),
        ("rank-1", "rank1"),
        ("rank-5", "rank5"),
        ("rank-10", "rank10"),
    ):
        lines.append(f"  {label:<8} {100 * result[key]:6.2f}%")
    lines.append(f"  valid queries: {result['num_valid_queries']} / {result['num_queries']}")
    return "\n".join(lines)


def evaluate_file(args: flags.FlagValues) -> tuple[dict, list[str]]:
    """(evaluate_ranking's result, notes) of the features in args.features under
    the settings of `args` (the parsed flags). InputError (one line) for a bad
    setting, a bad file, features of two models, distances that are not finite
    or no query with a match; the metrics are never NaN."""
    from jaxreid.inference import check_same_model, read_record

    check_settings(args)
    path = args.features
    data = load_features(path, need_stripes=args.distance == "scl")
    try:
        note = check_same_model(
            *(
                (f"{side} features", read_record(data, key))
                for side, key in zip(("query", "gallery"), RECORD_KEYS, strict=True)
            )
        )
    except UserError as e:
        raise InputError(f"{path}: {e}") from None
    with np.errstate(over="ignore", invalid="ignore"):  # refused just below
        distmat = compute_distance(args, data)
    bad = int((~np.isfinite(distmat)).sum())
    if bad:
        raise InputError(
            f"{path}: {bad} query-gallery distances are not finite (the features overflow "
            "float32 arithmetic); rescale them, e.g. to unit rows"
        )
    labels = [data[key] for key in REQUIRED_KEYS[2:]]  # query / gallery pids, then cams
    result = evaluate_ranking(
        distmat, *labels, max_rank=args.max_rank, max_block_bytes=args.max_block_bytes
    )
    if result["num_valid_queries"] == 0:
        raise InputError(
            f"{path}: no query has a match in the gallery under the protocol "
            "(same identity, other camera); check the pids / cams arrays"
        )
    return result, [f"{path}: {note}"] if note else []


def main(argv: Sequence[str] | None = None) -> int:
    args, _ = parse(define_flags, argv, PROG)
    try:
        result, notes = evaluate_file(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps({k: result[k] for k in JSON_KEYS}))
    else:
        print(_table(args.features, args, result))
    return 0
