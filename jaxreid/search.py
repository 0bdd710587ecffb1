"""The nearest gallery images of a query, from features written by jaxreid.extract.

    python -m jaxreid.search --features=/tmp/crops.npz --query=cam1/0001.jpg --top=10
    python -m jaxreid.search --features=/tmp/crops.npz --query=/new/person.jpg \\
        --workdir=/tmp/run --picture=/tmp/result.png

--query is a path stored in the .npz (its stored feature is used and the image
itself is left out of the results) or an image file, embedded with the run of
--workdir. Ranking: cosine distance of the global features (1 - cosine).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from jaxreid.host import configure_host

_FEATURES = flags.DEFINE_string("features", None, ".npz written by python -m jaxreid.extract.")
_QUERY = flags.DEFINE_string("query", None, "A path stored in the .npz, or an image file.")
_TOP = flags.DEFINE_integer("top", 10, "How many results.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run whose model embeds a new query image.")
_PICTURE = flags.DEFINE_string("picture", None, "Also draw the ranked list into this PNG.")
flags.mark_flags_as_required(["features", "query"])


def load_features(path: str) -> dict[str, np.ndarray]:
    from jaxreid.utils import UserError

    if not os.path.isfile(path):
        raise UserError(
            f"--features {path!r} does not exist; write it with python -m jaxreid.extract"
        )
    with np.load(path) as data:
        missing = [k for k in ("paths", "global") if k not in data]
        if missing:
            raise UserError(
                f"{path!r} has no {' / '.join(missing)} array(s): write it with "
                "python -m jaxreid.extract (it stores the paths beside the features)"
            )
        return {k: data[k] for k in data.files}


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


def main(argv) -> None:
    del argv
    configure_host()  # before jax starts a backend
    # orbax and jax log through absl at INFO; keep the console for results.
    absl_logging.set_verbosity(absl_logging.WARNING)
    from jaxreid.utils import UserError

    try:
        data = load_features(_FEATURES.value)
        paths = [str(p) for p in data["paths"]]
        root = str(data["root"]) if "root" in data else ""
        exclude = paths.index(_QUERY.value) if _QUERY.value in paths else None
        if exclude is not None:
            query = data["global"][exclude]
            query_path = os.path.join(root, _QUERY.value)
        else:
            if not os.path.isfile(_QUERY.value):
                raise UserError(
                    f"--query {_QUERY.value!r} is neither a path stored in {_FEATURES.value!r} "
                    "nor an image file"
                )
            if not _WORKDIR.value:
                raise UserError("a new query image needs --workdir (the run whose model embeds it)")
            from jaxreid.inference import Embedder

            query = Embedder.from_workdir(_WORKDIR.value).embed([_QUERY.value])["global"][0]
            query_path = _QUERY.value
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    order, distances = search(query, data["global"], _TOP.value, exclude)
    for rank, (index, distance) in enumerate(zip(order, distances, strict=True), start=1):
        print(f"{rank:3d}  {distance:.4f}  {paths[index]}")
    if _PICTURE.value:
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
            _PICTURE.value,
            top_k=len(order),
        )
        print(f"wrote {_PICTURE.value}")


if __name__ == "__main__":
    app.run(main)
