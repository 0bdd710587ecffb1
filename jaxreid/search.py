"""The nearest gallery images of a query, from features written by jaxreid.extract.

    python -m jaxreid.search --features=/tmp/crops.npz --query=cam1/0001.jpg --top=10
    python -m jaxreid.search --features=/tmp/crops.npz --query=/new/person.jpg \\
        --workdir=/tmp/run --picture=/tmp/result.png

--query is a path stored in the .npz (its stored feature is used and the image
itself is left out of the results) or an image file, embedded with the run of
--workdir. Ranking: cosine distance of the global features (1 - cosine).
Refused, one line and exit 2: --top < 1, a --features file that is not an
.npz of jaxreid.extract, a query embedded by another model than the one the
.npz records (or, in a file without the record, of another dimension), a
--picture that cannot be written (checked before any work).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags
from absl import logging as absl_logging

from jaxreid.command_line import parse, run
from jaxreid.host import configure_host

PROG = "python -m jaxreid.search"


def define_flags(fv: flags.FlagValues) -> None:
    """The nearest gallery images of a query, from features written by jaxreid.extract."""
    flags.DEFINE_string(
        "features",
        None,
        ".npz written by python -m jaxreid.extract.",
        flag_values=fv,
        required=True,
    )
    flags.DEFINE_string(
        "query", None, "A path stored in the .npz, or an image file.", flag_values=fv, required=True
    )
    flags.DEFINE_integer("top", 10, "How many results.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string(
        "workdir", None, "Run whose model embeds a new query image.", flag_values=fv
    )
    flags.DEFINE_string("picture", None, "Also draw the ranked list into this PNG.", flag_values=fv)


def load_features(path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz written by jaxreid.extract; UserError (one line)
    for a missing file, another format or missing / malformed arrays."""
    from jaxreid.evaluate.cli import open_archive
    from jaxreid.utils import UserError

    with open_archive(path, "python -m jaxreid.extract") as data:
        missing = [k for k in ("paths", "global") if k not in data.files]
        if missing:
            raise UserError(
                f"{path!r} has no {' / '.join(missing)} array(s): write it with "
                "python -m jaxreid.extract (it stores the paths beside the features)"
            )
        arrays = {k: data[k] for k in data.files}
    features, paths = arrays["global"], arrays["paths"]
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise UserError(
            f"{path!r}: global must be (N, D) floating point, got {features.dtype} "
            f"{features.shape}; write it with python -m jaxreid.extract"
        )
    if paths.ndim != 1 or len(paths) != len(features):
        raise UserError(
            f"{path!r}: paths {paths.shape} and global {features.shape} differ in length; "
            "one path per row: write it with python -m jaxreid.extract"
        )
    return arrays


def search(
    query: np.ndarray, gallery: np.ndarray, top: int, exclude: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine distances) of the `top` nearest gallery rows, stable order."""
    from jaxreid.utils import l2_normalize

    distance = 1.0 - l2_normalize(gallery) @ l2_normalize(query)
    if exclude is not None:
        distance[exclude] = np.inf
    order = np.argsort(distance, kind="stable")[:top]
    order = order[np.isfinite(distance[order])]
    return order, distance[order]


def embed_query(image: str, workdir: str | None, features: str, data: dict) -> np.ndarray:
    """The global feature of a new query image, embedded with the run of
    `workdir`; UserError when that model is not the one that made `data` (its
    record), or, for a file without a record, when the dimensions differ."""
    from jaxreid.inference import Embedder, check_same_model, read_record
    from jaxreid.utils import UserError

    if not os.path.isfile(image):
        raise UserError(
            f"--query {image!r} is neither a path stored in {features!r} nor an image file"
        )
    if not workdir:
        raise UserError("a new query image needs --workdir (the run whose model embeds it)")
    embedder = Embedder.from_workdir(workdir)
    note = check_same_model(
        (f"--features {features!r}", read_record(data)),
        (f"the query embedded by --workdir {workdir!r}", embedder.record),
    )
    query = embedder.embed(image)["global"][0]
    gallery_dim = data["global"].shape[1]
    if query.shape[-1] != gallery_dim:
        raise UserError(
            f"the query embedded by --workdir {workdir!r} is {query.shape[-1]}-d, the features "
            f"of {features!r} {gallery_dim}-d: another model; pass the --workdir that "
            "extracted them"
        )
    if note:
        print(note, file=sys.stderr)
    return query


def main(argv: list[str] | None = None) -> int:
    args, _ = parse(define_flags, argv, PROG)
    configure_host()  # before jax starts a backend
    # orbax and jax log through absl at INFO; keep the console for results.
    absl_logging.set_verbosity(absl_logging.WARNING)
    from jaxreid.utils import UserError

    try:
        if args.picture:
            from jaxreid.inference import check_output

            check_output(args.picture, "--picture")
        data = load_features(args.features)
        paths = [str(p) for p in data["paths"]]
        root = str(data["root"]) if "root" in data else ""
        exclude = paths.index(args.query) if args.query in paths else None
        if exclude is not None:
            query = data["global"][exclude]
            query_path = os.path.join(root, args.query)
        else:
            query = embed_query(args.query, args.workdir, args.features, data)
            query_path = args.query
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    order, distances = search(query, data["global"], args.top, exclude)
    for rank, (index, distance) in enumerate(zip(order, distances, strict=True), start=1):
        print(f"{rank:3d}  {distance:.4f}  {paths[index]}")
    if args.picture:
        from jaxreid.evaluate import plots

        distmat = np.full((1, len(paths)), np.inf, np.float32)
        distmat[0, order] = distances
        plots.ranked_list_grid(
            distmat,
            [query_path],
            [os.path.join(root, p) for p in paths],
            None,
            None,
            None,
            None,
            [0],
            args.picture,
            top_k=len(order),
        )
        print(f"wrote {args.picture}")
    return 0


if __name__ == "__main__":
    run(main)
