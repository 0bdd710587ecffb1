"""Pseudo-label clustering cost: kNN + k-reciprocal Jaccard + DBSCAN, sparse vs dense.

    python benchmarks/clustering.py                          # N = 12,936 and 32,621 (CPU)
    python benchmarks/clustering.py --sizes 100000 200000 --dense-max 0
    python benchmarks/clustering.py --sizes 1000000 --methods sparse-jax --dense-max 0  # GPU

Methods: "sparse-faiss" / "sparse-jax" = jaxreid (`kreciprocal.jaccard_distance` with the FAISS or
the JAX kNN, then `clustering.dbscan`); "dense" = the usual implementation written out below:
N x N float32 encodings and Jaccard matrix, Python loops over rows, scikit-learn's DBSCAN
(jaxreid's `dbscan` on the dense matrix when scikit-learn is missing). Both use k1 = 30, k2 = 6,
eps = 0.6, min_samples = 4 and the same FAISS neighbour lists, so their clusters must agree.

Every measurement runs in a fresh subprocess. Peak memory is that process's peak resident set
(VmHWM of /proc/self/status): everything included (Python, jax, faiss, the features
array). "base" is the resident set once the features exist, before any clustering work.

Features: unit vectors in 2,048-d, N/8 clusters (centres grouped 16 by 16, so neighbour lists
reach neighbouring clusters; per-point noise level drawn from [0.8, 2.2]) plus 15% unclustered
points, generated in row blocks from a fixed seed.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags

from jaxreid.command_line import parse, run
from jaxreid.host import configure_host
from jaxreid.utils import l2_normalize

K1, K2, EPS, MIN_SAMPLES = 30, 6, 0.6, 4


def clustered_features(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    num_clusters = max(1, n // 8)
    num_groups = max(1, num_clusters // 16)
    groups = l2_normalize(rng.standard_normal((num_groups, dim), dtype=np.float32))
    centres = l2_normalize(
        groups[rng.integers(num_groups, size=num_clusters)]
        + l2_normalize(rng.standard_normal((num_clusters, dim), dtype=np.float32))
    )
    labels = rng.integers(num_clusters, size=n)
    unclustered = rng.random(n) < 0.15
    noise = rng.uniform(0.8, 2.2, size=n).astype(np.float32)
    features = np.empty((n, dim), np.float32)
    for start in range(0, n, 4096):
        rows = slice(start, start + 4096)
        directions = l2_normalize(rng.standard_normal((len(features[rows]), dim), dtype=np.float32))
        base = centres[labels[rows]]
        base[unclustered[rows]] = 0.0
        features[rows] = l2_normalize(base + noise[rows, None] * directions)
    return features


def dense_jaccard(order: np.ndarray, features: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """The usual dense implementation: N x N float32 arrays, loops over rows."""
    n = len(order)
    half = int(np.around(k1 / 2))

    def reciprocal(i, k):
        forward = order[i, : k + 1]
        backward = order[forward, : k + 1]
        return forward[np.any(backward == i, axis=1)]

    r_full = [reciprocal(i, k1) for i in range(n)]
    r_half = [reciprocal(i, half) for i in range(n)]
    encoding = np.zeros((n, n), np.float32)
    for i in range(n):
        members = r_full[i]
        for c in r_full[i]:
            if len(np.intersect1d(r_half[c], r_full[i])) > 2 / 3 * len(r_half[c]):
                members = np.append(members, r_half[c])
        members = np.unique(members)
        dist = 2.0 - 2.0 * features[members] @ features[i]
        weights = np.exp(-(dist - dist.min()))
        encoding[i, members] = weights / weights.sum()
    expanded = np.zeros((n, n), np.float32)
    for i in range(n):
        expanded[i] = encoding[order[i, :k2]].mean(axis=0)
    del encoding
    inverted = [np.flatnonzero(expanded[:, j]) for j in range(n)]
    jaccard = np.zeros((n, n), np.float32)
    for i in range(n):
        mins = np.zeros(n, np.float32)
        for j in np.flatnonzero(expanded[i]):
            rows = inverted[j]
            mins[rows] += np.minimum(expanded[i, j], expanded[rows, j])
        jaccard[i] = 1.0 - mins / (2.0 - mins)
    np.maximum(jaccard, 0.0, out=jaccard)
    return jaccard


def _peak_rss_gib() -> float:
    # VmHWM: this process's own peak. ru_maxrss would also count the parent's resident set
    # at the spawn (Linux keeps the larger of the two across exec).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def measure(method: str, n: int, dim: int, labels_out: str | None, log=None) -> dict:
    """One clustering of N generated features; `log(message)` reports each stage's end."""
    from jaxreid.pseudo_labels import clustering, kreciprocal, neighbors

    log = log or (lambda message: None)
    features = clustered_features(n, dim)
    base = _current_rss_gib()
    log(f"N={n}: features generated")
    start = time.perf_counter()
    backend = "jax" if method == "sparse-jax" else "faiss"
    sims, order = neighbors.knn(features, K1, backend=backend)
    knn_seconds = time.perf_counter() - start
    log(f"N={n}: kNN {knn_seconds:.1f} s")
    if method == "dense":
        distance = dense_jaccard(order, features, K1, K2)
        stored = int((distance < 1).sum())
    else:
        distance = kreciprocal.jaccard_distance(
            features, K1, K2, max_distance=EPS, neighbors_result=(sims, order)
        )
        stored = distance.nnz
    jaccard_seconds = time.perf_counter() - start - knn_seconds
    log(f"N={n}: Jaccard {jaccard_seconds:.1f} s")
    try:
        if method != "dense":
            raise ImportError
        from sklearn.cluster import DBSCAN

        labels = DBSCAN(
            eps=EPS, min_samples=MIN_SAMPLES, metric="precomputed", n_jobs=-1
        ).fit_predict(distance)
        dbscan_impl = "sklearn"
    except ImportError:
        labels = clustering.dbscan(distance, EPS, MIN_SAMPLES)
        dbscan_impl = "jaxreid"
    total = time.perf_counter() - start
    if labels_out:
        np.save(labels_out, labels)
    stats = clustering.pseudo_label_stats(labels)
    return dict(
        method=method,
        n=n,
        knn_s=knn_seconds,
        jaccard_s=jaccard_seconds,
        dbscan_s=total - knn_seconds - jaccard_seconds,
        total_s=total,
        peak_gib=_peak_rss_gib(),
        base_gib=base,
        stored_pairs=stored,
        clusters=stats["num_clusters"],
        outliers=stats["num_outliers"],
        dbscan_impl=dbscan_impl,
    )


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def _run_child(method: str, n: int, dim: int, labels_out: str) -> dict | None:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        method,
        "--sizes",
        str(n),
        "--dim",
        str(dim),
        "--labels-out",
        labels_out,
    ]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{method} N={n} failed:\n{proc.stderr[-2000:]}", flush=True)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = load
    return result


PROG = "benchmarks/clustering.py"


def define_flags(fv: flags.FlagValues) -> None:
    """Pseudo-label clustering cost: kNN + k-reciprocal Jaccard + DBSCAN, sparse vs dense."""
    flags.DEFINE_multi_integer("sizes", [12936, 32621], "feature counts N", flag_values=fv)
    flags.DEFINE_integer("dim", 2048, "feature dimension", flag_values=fv)
    methods = ["sparse-faiss", "sparse-jax", "dense"]
    flags.DEFINE_multi_enum("methods", methods, methods, "methods to time", flag_values=fv)
    flags.DEFINE_integer(
        "dense_max", 32621, "largest N for the dense method (it needs ~9 N^2 bytes)", flag_values=fv
    )
    flags.DEFINE_string("child", None, "internal: the measuring subprocess", flag_values=fv)
    flags.DEFINE_string("labels_out", None, "internal: its labels file", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG, multi=("sizes", "methods"))
    if args.child:
        print(json.dumps(measure(args.child, args.sizes[0], args.dim, args.labels_out)))
        return

    from jaxreid.utils import machine_description

    print(
        f"# clustering benchmark: k1={K1}, k2={K2}, eps={EPS}, min_samples={MIN_SAMPLES}, "
        f"dim={args.dim}",
        flush=True,
    )
    print(machine_description(), flush=True)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            labels = {}
            for method in args.methods:
                if method == "dense":
                    need = 9.5 * n * n / 2**30 + 1.0
                    if n > args.dense_max or _available_gib() < need + 2.0:
                        notes.append(
                            f"dense skipped at N={n} (needs ~{need:.1f} GiB; "
                            f"{_available_gib():.1f} GiB available, --dense-max "
                            f"{args.dense_max})"
                        )
                        continue
                path = os.path.join(tmp, f"{method}-{n}.npy")
                result = _run_child(method, n, args.dim, path)
                if result is None:
                    continue
                rows.append(result)
                labels[method] = np.load(path)
                print(json.dumps(result), flush=True)
            for method, other in labels.items():
                if method != "sparse-faiss" and "sparse-faiss" in labels:
                    same = np.array_equal(labels["sparse-faiss"], other)
                    differ = int((labels["sparse-faiss"] != other).sum())
                    notes.append(
                        f"N={n}: sparse-faiss vs {method} DBSCAN labels "
                        f"{'identical' if same else f'differ at {differ} points'}"
                    )
    print()
    print(
        "| N | method | kNN s | Jaccard s | DBSCAN s | total s | peak RSS GiB | base GiB "
        "| stored pairs | clusters | outliers | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['method']} | {r['knn_s']:.1f} | {r['jaccard_s']:.1f} | "
            f"{r['dbscan_s']:.1f} | {r['total_s']:.1f} | {r['peak_gib']:.2f} | "
            f"{r['base_gib']:.2f} | {r['stored_pairs']:,} | {r['clusters']:,} | "
            f"{r['outliers']:,} | {r['load']:.1f} |"
        )
    for note in notes:
        print(f"- {note}")
    print("- load = 1-min load average when the measurement started (other work shares the CPU)")


if __name__ == "__main__":
    run(main)
