"""Evaluation cost at Market-1501 sizes: distance matrix, mAP / CMC, re-ranking.

Random L2-normalised features clustered by identity (so that the ranking is
neither trivial nor random), 3,368 queries x 15,913 gallery by default, 750
identities over 6 cameras plus pid-0 distractors in the gallery. Prints a
markdown table and the machine description.

    python benchmarks/evaluation.py [--num-query 3368 --num-gallery 15913 --dim 2048]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from absl import flags

from jaxreid import evaluate
from jaxreid.command_line import parse, run
from jaxreid.host import configure_host
from jaxreid.utils import machine_description


def make_problem(args: flags.FlagValues) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    num_distractors = int(args.distractor_fraction * args.num_gallery)
    gallery_pids = np.concatenate(
        [
            rng.integers(1, args.num_ids + 1, args.num_gallery - num_distractors),
            np.zeros(num_distractors, np.int64),
        ]
    )
    query_pids = rng.integers(1, args.num_ids + 1, args.num_query)
    centres = rng.normal(size=(args.num_ids + 1, args.dim)).astype(np.float32)

    def features(pids: np.ndarray) -> np.ndarray:
        noise = rng.normal(scale=args.noise, size=(len(pids), args.dim)).astype(np.float32)
        x = centres[pids] + noise
        x[pids == 0] = rng.normal(size=(int((pids == 0).sum()), args.dim))
        return evaluate.l2_normalize(x)

    qf, gf = features(query_pids), features(gallery_pids)
    stripe_dim = args.dim // args.num_stripes

    def stripes(x: np.ndarray) -> np.ndarray:
        return evaluate.l2_normalize(x.reshape(len(x), args.num_stripes, stripe_dim))

    return dict(
        query_features=qf,
        gallery_features=gf,
        query_stripes=stripes(qf),
        gallery_stripes=stripes(gf),
        query_pids=query_pids,
        gallery_pids=gallery_pids,
        query_cams=rng.integers(0, args.num_cams, args.num_query),
        gallery_cams=rng.integers(0, args.num_cams, args.num_gallery),
    )


def timed(fn: Callable[[], object], repeats: int) -> tuple[object, float]:
    """Result of the last call and the best wall time over `repeats` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


PROG = "benchmarks/evaluation.py"


def define_flags(fv: flags.FlagValues) -> None:
    """Evaluation cost on a synthetic retrieval problem (see the module docstring)."""
    for name, default in (
        ("num_query", 3368),
        ("num_gallery", 15913),
        ("dim", 2048),
        ("num_stripes", 8),
        ("num_ids", 750),
        ("num_cams", 6),
    ):
        flags.DEFINE_integer(name, default, "problem size", flag_values=fv)
    flags.DEFINE_float("distractor_fraction", 0.18, "gallery distractors", flag_values=fv)
    flags.DEFINE_float("noise", 3.5, "per-image noise vs centre", flag_values=fv)
    flags.DEFINE_integer(
        "max_block_bytes", evaluate.DEFAULT_MAX_BLOCK_BYTES, "distance block", flag_values=fv
    )
    flags.DEFINE_integer("repeats", 1, "timed calls (best of)", flag_values=fv)
    flags.DEFINE_bool("skip_scl", False, "skip the SCL distance", flag_values=fv)
    flags.DEFINE_bool("skip_rerank", False, "skip re-ranking", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "problem seed", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG)

    data = make_problem(args)
    labels = [data[k] for k in ("query_pids", "gallery_pids", "query_cams", "gallery_cams")]
    shape = f"{args.num_query} x {args.num_gallery}"
    rows = []

    distmat, seconds = timed(
        lambda: evaluate.cosine_distance(
            data["query_features"], data["gallery_features"], max_block_bytes=args.max_block_bytes
        ),
        args.repeats,
    )
    rows.append(("cosine distance", f"{shape}, D={args.dim}", seconds, ""))
    result, seconds = timed(
        lambda: evaluate.evaluate_ranking(distmat, *labels, max_block_bytes=args.max_block_bytes),
        args.repeats,
    )
    summary = f"mAP {100 * result['mAP']:.1f}, rank-1 {100 * result['rank1']:.1f}"
    rows.append(("evaluate_ranking", shape, seconds, summary))

    if not args.skip_scl:
        scl, seconds = timed(
            lambda: evaluate.scl_distance(
                data["query_features"],
                data["gallery_features"],
                data["query_stripes"],
                data["gallery_stripes"],
                data["query_cams"],
                data["gallery_cams"],
                max_block_bytes=args.max_block_bytes,
            ),
            args.repeats,
        )
        r = evaluate.evaluate_ranking(scl, *labels, max_block_bytes=args.max_block_bytes)
        rows.append(
            (
                "scl distance",
                f"{shape}, D={args.dim}, P={args.num_stripes}",
                seconds,
                f"mAP {100 * r['mAP']:.1f}, rank-1 {100 * r['rank1']:.1f}",
            )
        )
        del scl

    rerank_fn = None
    if not args.skip_rerank:
        try:
            from jaxreid.pseudo_labels import kreciprocal

            rerank_fn = getattr(kreciprocal, "k_reciprocal_rerank", None)
        except ImportError:
            pass
    if rerank_fn is None:
        reason = "--skip-rerank" if args.skip_rerank else "not available"
        rows.append(("k-reciprocal re-ranking", shape, None, f"skipped: {reason}"))
    else:
        reranked, seconds = timed(
            lambda: rerank_fn(data["query_features"], data["gallery_features"]),
            args.repeats,
        )
        r = evaluate.evaluate_ranking(
            np.asarray(reranked), *labels, max_block_bytes=args.max_block_bytes
        )
        rows.append(
            (
                "k-reciprocal re-ranking",
                f"{shape} (k1=20, k2=6, lambda=0.3)",
                seconds,
                f"mAP {100 * r['mAP']:.1f}, rank-1 {100 * r['rank1']:.1f}",
            )
        )

    print(f"max_block_bytes = {args.max_block_bytes}, best of {args.repeats}")
    print()
    print("| step | problem | seconds | result |")
    print("|---|---|---:|---|")
    for name, problem, sec, note in rows:
        sec_text = "-" if sec is None else f"{sec:.2f}"
        print(f"| {name} | {problem} | {sec_text} | {note} |")
    print()
    print(machine_description())


if __name__ == "__main__":
    run(main)
