"""Pseudo-label clustering at 10^4-10^6 images: exact vs approximate kNN (cluster.knn).

    python benchmarks/clustering_scale.py --sizes 10000 100000 --dim 2048
    python benchmarks/clustering_scale.py --sizes 1000000 --dim 2048 --knn ivf
    python benchmarks/clustering_scale.py --features=/tmp/cuhk03.npz --knn exact ivf hnsw

For each N and kNN index (exact, ivf, hnsw; `jaxreid.pseudo_labels.neighbors`) one fresh
subprocess runs the clustering pipeline of training (k1 = 30 kNN -> sparse k-reciprocal Jaccard
-> DBSCAN, eps 0.6, min_samples 4) and reports, side by side:

- recall@20 of its kNN lists against the exact search on 2,000 evenly spaced queries (the exact
  lists of those queries come from one chunked exact scan, so no full exact run is needed),
  overall and split into the identity images and the outliers (the outliers' exact neighbours
  are random rows at near-equal similarity, which no index short of a full scan recovers);
- ARI (adjusted Rand index, outliers as singletons) of its DBSCAN labels against the exact
  pipeline's labels (where the exact row ran) and against the generating identities;
- wall time of the kNN, the Jaccard distance and DBSCAN, and the peak resident set
  (VmHWM of the subprocess: Python, faiss, jax, the pages of the feature file it read).

Features: identities of 5-30 images (uniform), 18% of the images outliers (no identity);
identity centres are grouped 20 by 20 ("look-alike" groups: similar clothes), so the neighbours
beyond an identity are its group, not random points; an image is its centre plus an isotropic
unit direction times a noise level drawn from [0.6, 1.3], L2-normalised. Generated once per
(N, dim, seed) in 16,384-row chunks straight into a .npy memory map under --data-dir (float32,
or float16 with --float16 / automatically when N * dim * 4 bytes exceeds --max-f32-gib), with
the identities beside it; the subprocesses map the file, never copy it whole.

Real features: --features names a `python -m jaxreid.extract` .npz of a
Market-1501-layout folder (e.g. a model's features of CUHK03's train, query
and gallery images); its `global` rows are clustered instead (--sizes and
--dim do not apply), and the identities, for the scores only, come from the
file names (train and test identities kept apart; junk -1 and distractor 0
images count as outliers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import flags

from jaxreid.command_line import parse, run
from jaxreid.host import configure_host

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clustering import _available_gib, _current_rss_gib, _peak_rss_gib  # noqa: E402

K1, K2, EPS, MIN_SAMPLES, RECALL_K, RECALL_QUERIES = 30, 6, 0.6, 4, 20, 2000
OUTLIER_SHARE, GROUP = 0.18, 20
_CHUNK = 16384


def _paths(data_dir: str, n: int, dim: int, seed: int) -> tuple[str, str]:
    stem = os.path.join(data_dir, f"identities-{n}x{dim}-seed{seed}")
    return stem + ".npy", stem + "-identity.npy"


def generate(n: int, dim: int, seed: int, path: str, truth_path: str, dtype) -> None:
    """Writes the features (memory map, chunk by chunk) and identities (-1 = outlier)."""
    rng = np.random.default_rng(seed)
    clustered = rng.random(n) >= OUTLIER_SHARE
    sizes = rng.integers(5, 31, size=int(clustered.sum()) // 5 + 1)
    identity = np.repeat(np.arange(len(sizes)), sizes)[: int(clustered.sum())]
    truth = np.full(n, -1, np.int64)
    truth[clustered] = rng.permutation(identity)  # images of one identity spread over the set
    num_ids = int(truth.max()) + 1
    groups = rng.standard_normal((max(1, num_ids // GROUP), dim), dtype=np.float32)
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    # Identity centre = its group's direction + an own direction of equal length (float16:
    # 0.2 GB at 10^6 x 2048, the only array besides one chunk).
    centres = np.empty((num_ids, dim), np.float16)
    for s in range(0, num_ids, _CHUNK):
        c = rng.standard_normal((min(_CHUNK, num_ids - s), dim), dtype=np.float32)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        c += groups[(np.arange(s, s + len(c)) // GROUP) % len(groups)]
        centres[s : s + len(c)] = c / np.linalg.norm(c, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(path + ".tmp", "w+", dtype, (n, dim))
    for start in range(0, n, _CHUNK):
        rows = slice(start, min(start + _CHUNK, n))
        t = truth[rows]
        base = np.where((t >= 0)[:, None], centres[np.maximum(t, 0)].astype(np.float32), 0.0)
        noise = rng.standard_normal((len(t), dim), dtype=np.float32)
        noise *= (rng.uniform(0.6, 1.3, len(t)) / np.linalg.norm(noise, axis=1))[:, None]
        x = base + noise
        out[rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
        if start // _CHUNK % 16 == 0:
            print(f"  generated {rows.stop:,} / {n:,}", flush=True)
    out.flush()
    del out
    os.replace(path + ".tmp", path)
    np.save(truth_path, truth)


def real_features(npz: str, data_dir: str) -> tuple[str, str]:
    """(feature .npy, identity .npy) under `data_dir` of a jaxreid.extract .npz
    (module doc): float32 rows, identity -1 for junk and distractors."""
    from jaxreid.data.datasets import parse_market_name

    stem = os.path.join(data_dir, "real-" + os.path.splitext(os.path.basename(npz))[0])
    with np.load(npz) as z:
        features = np.asarray(z["global"], np.float32)
        paths = [str(p) for p in z["paths"]]
    keys = []
    for path in paths:
        folder, name = os.path.split(path)
        pid, _ = parse_market_name(name, folder)
        keys.append(None if pid <= 0 else ("train" in folder, pid))
    ids = {k: i for i, k in enumerate(sorted({k for k in keys if k is not None}))}
    identity = np.array([-1 if k is None else ids[k] for k in keys], np.int64)
    np.save(stem + ".npy", features)
    np.save(stem + "-identity.npy", identity)
    print(f"{npz}: {len(paths):,} x {features.shape[1]}, {len(ids):,} identities", flush=True)
    return stem + ".npy", stem + "-identity.npy"


def synthetic_features(n: int, args) -> tuple[str, str]:
    """(feature .npy, identity .npy) of N generated features under --data_dir,
    generated first where missing (float16 with --float16 or above
    --max_f32_gib)."""
    path, truth_path = _paths(args.data_dir, n, args.dim, args.seed)
    f16 = args.float16 or n * args.dim * 4 / 2**30 > args.max_f32_gib
    if f16:
        path = path.replace(".npy", "-f16.npy")
    if not os.path.exists(path):
        need = n * args.dim * (2 if f16 else 4) / 2**30
        print(f"generating {n:,} x {args.dim} ({need:.1f} GiB) -> {path}", flush=True)
        tick = time.perf_counter()
        generate(n, args.dim, args.seed, path, truth_path, np.float16 if f16 else np.float32)
        print(f"  {time.perf_counter() - tick:.0f} s", flush=True)
    return path, truth_path


def _sample(n: int) -> np.ndarray:
    return np.linspace(0, n - 1, min(n, RECALL_QUERIES)).astype(np.int64)


def measure(index: str, path: str, out_prefix: str, overrides: dict[str, int]) -> dict:
    """One clustering of the mapped features with kNN index `index` (in the subprocess)."""
    from jaxreid.pseudo_labels import clustering, kreciprocal, neighbors

    features = np.load(path, mmap_mode="r")
    n = len(features)
    base = _current_rss_gib()
    start = time.perf_counter()
    params = neighbors.IndexParams(**overrides)
    sims, order = neighbors.knn(features, K1, index=index, params=params)
    knn_s = time.perf_counter() - start
    knn_peak = _peak_rss_gib()
    print(
        f"  {index} N={n:,}: kNN {knn_s:.1f} s, peak RSS {knn_peak:.2f} GiB",
        file=sys.stderr,
        flush=True,
    )
    np.save(out_prefix + "-sample-knn.npy", order[_sample(n), :RECALL_K])
    tick = time.perf_counter()
    distance = kreciprocal.jaccard_distance(
        features,
        K1,
        K2,
        max_distance=EPS,
        neighbors_result=(sims, order),
    )
    jaccard_s = time.perf_counter() - tick
    jaccard_peak = _peak_rss_gib()
    print(
        f"  {index} N={n:,}: Jaccard {jaccard_s:.1f} s, peak RSS {jaccard_peak:.2f} GiB",
        file=sys.stderr,
        flush=True,
    )
    del sims, order
    tick = time.perf_counter()
    labels = clustering.dbscan(distance, EPS, MIN_SAMPLES)
    dbscan_s = time.perf_counter() - tick
    np.save(out_prefix + "-labels.npy", labels)
    stats = clustering.pseudo_label_stats(labels)
    return dict(
        knn=index,
        resolved=neighbors.resolve_index(index, n),
        params=neighbors.index_params(n, K1 + 8, params) if index != "exact" else {},
        n=n,
        dim=features.shape[1],
        dtype=str(features.dtype),
        knn_s=knn_s,
        jaccard_s=jaccard_s,
        dbscan_s=dbscan_s,
        total_s=knn_s + jaccard_s + dbscan_s,
        peak_gib=_peak_rss_gib(),
        knn_peak_gib=knn_peak,
        jaccard_peak_gib=jaccard_peak,
        base_gib=base,
        stored_pairs=int(distance.nnz),
        clusters=stats["num_clusters"],
        outliers=stats["num_outliers"],
    )


def exact_sample_neighbors(features: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact k nearest (the query first) of features[rows], scanning the map in chunks."""
    queries = np.asarray(features[rows], np.float32)
    best_s = np.full((len(rows), k), -np.inf, np.float32)
    best_i = np.zeros((len(rows), k), np.int64)
    for start in range(0, len(features), _CHUNK):
        s = queries @ np.asarray(features[start : start + _CHUNK], np.float32).T
        s[(rows - start)[:, None] == np.arange(s.shape[1])[None, :]] = np.inf  # self first, as knn
        all_s = np.concatenate([best_s, s], axis=1)
        all_i = np.concatenate([best_i, start + np.broadcast_to(np.arange(s.shape[1]), s.shape)], 1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(all_s, top, 1)
        best_i = np.take_along_axis(all_i, top, 1)
    return best_i


def _singletons(labels: np.ndarray) -> np.ndarray:
    """Outliers (-1) as clusters of their own, for the adjusted Rand index."""
    labels = np.asarray(labels, np.int64).copy()
    out = labels < 0
    labels[out] = labels.max(initial=-1) + 1 + np.arange(int(out.sum()))
    return labels


_OVERRIDES = ("nlist", "nprobe", "hnsw_m", "ef_search")


def _run_child(index: str, path: str, out_prefix: str, args) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", index, "--child_data", path]
    cmd += ["--child_out", out_prefix]
    cmd += [f"--{name}={getattr(args, name)}" for name in _OVERRIDES]
    load = os.getloadavg()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"{index} on {path} failed (exit {proc.returncode})", flush=True)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = "/".join(f"{x:.1f}" for x in load)
    return result


PROG = "benchmarks/clustering_scale.py"


def define_flags(fv: flags.FlagValues) -> None:
    """Pseudo-label clustering at 10^4-10^6 images: exact vs approximate kNN."""
    flags.DEFINE_multi_integer("sizes", [10000, 100000], "feature counts N", flag_values=fv)
    flags.DEFINE_integer("dim", 2048, "feature dimension", flag_values=fv)
    flags.DEFINE_multi_enum(
        "knn",
        ["exact", "ivf", "hnsw"],
        ["exact", "ivf", "hnsw", "auto"],
        "kNN indexes",
        flag_values=fv,
    )
    flags.DEFINE_integer("exact_max", 100_000, "largest N for the exact row", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "feature generator seed", flag_values=fv)
    flags.DEFINE_string(
        "data_dir", "/tmp/jaxreid-clustering-scale", "feature files", flag_values=fv
    )
    flags.DEFINE_bool("float16", False, "store the features as float16", flag_values=fv)
    flags.DEFINE_string(
        "features",
        None,
        "a jaxreid.extract .npz of a Market-layout folder: cluster its features instead",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "max_f32_gib", 4.0, "store float16 when float32 would exceed this", flag_values=fv
    )
    for name in ("nlist", "nprobe", "hnsw_m", "ef_search"):
        flags.DEFINE_integer(name, 0, f"index {name} (0 = derived from N)", flag_values=fv)
    flags.DEFINE_string("child", None, "internal: the measuring subprocess", flag_values=fv)
    flags.DEFINE_string("child_data", None, "internal: its feature file", flag_values=fv)
    flags.DEFINE_string("child_out", None, "internal: its output prefix", flag_values=fv)


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _table(rows: list[dict]) -> None:
    print()
    print(
        "| N x D | dtype | kNN | recall@20 | identity / outlier | ARI vs exact | ARI vs identities "
        "| kNN s | Jaccard s | DBSCAN s | total s | peak RSS GiB | base GiB | clusters | outliers "
        "| load 1/5/15 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ari_exact = "-" if r["ari_exact"] is None else f"{r['ari_exact']:.4f}"
        print(
            f"| {r['n']:,} x {r['dim']} | {r['dtype']} | {r['knn']} | {r['recall']:.4f} | "
            f"{r['recall_identity']:.4f} / {_number(r['recall_outlier'])} | "
            f"{ari_exact} | {r['ari_truth']:.4f} | {r['knn_s']:.1f} | {r['jaccard_s']:.1f} | "
            f"{r['dbscan_s']:.1f} | {r['total_s']:.1f} | {r['peak_gib']:.2f} | "
            f"{r['base_gib']:.2f} | {r['clusters']:,} | {r['outliers']:,} | {r['load']} |"
        )


def main(argv: list[str] | None = None) -> None:
    configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG, multi=("sizes", "knn"))
    if args.child:
        overrides = {name: getattr(args, name) for name in _OVERRIDES}
        print(json.dumps(measure(args.child, args.child_data, args.child_out, overrides)))
        return
    from sklearn.metrics import adjusted_rand_score

    from jaxreid.pseudo_labels import neighbors
    from jaxreid.utils import machine_description

    print(
        f"# clustering at scale: k1={K1}, k2={K2}, eps={EPS}, min_samples={MIN_SAMPLES}, "
        f"features {args.features or f'generated, dim={args.dim}'}, "
        f"auto = exact up to {neighbors.AUTO_EXACT_MAX:,} rows, "
        f"{neighbors.AUTO_INDEX} above",
        flush=True,
    )
    print(machine_description(), flush=True)
    os.makedirs(args.data_dir, exist_ok=True)
    rows = []
    if args.features:
        feature_sets = [real_features(args.features, args.data_dir)]
    else:  # generated when its turn comes
        feature_sets = (synthetic_features(n, args) for n in args.sizes)
    for path, truth_path in feature_sets:
        features = np.load(path, mmap_mode="r")
        n, dim = features.shape
        identity = np.load(truth_path)
        truth = _singletons(identity)
        sample = _sample(n)
        is_outlier = identity[sample] < 0
        tick = time.perf_counter()
        exact_sample = exact_sample_neighbors(features, sample, RECALL_K)
        print(f"exact lists of {len(sample):,} queries: {time.perf_counter() - tick:.0f} s")
        del features
        exact_labels = None
        for index in args.knn:
            if index == "exact" and n > args.exact_max:
                print(f"exact skipped at N={n:,} (--exact_max {args.exact_max:,})")
                continue
            prefix = os.path.join(args.data_dir, f"out-{n}x{dim}-{index}")
            print(f"{index} N={n:,} (available {_available_gib():.1f} GiB)", flush=True)
            result = _run_child(index, path, prefix, args)
            if result is None:
                continue
            labels = np.load(prefix + "-labels.npy")
            found = np.load(prefix + "-sample-knn.npy")
            hits = np.array(
                [len(set(a) & set(b)) / RECALL_K for a, b in zip(found, exact_sample, strict=True)]
            )
            result["recall"] = float(hits.mean())
            result["recall_identity"] = float(hits[~is_outlier].mean())
            result["recall_outlier"] = float(hits[is_outlier].mean()) if is_outlier.any() else None
            if index == "exact":
                exact_labels = _singletons(labels)
            result["ari_exact"] = (
                None
                if exact_labels is None
                else adjusted_rand_score(exact_labels, _singletons(labels))
            )
            result["ari_truth"] = adjusted_rand_score(truth, _singletons(labels))
            rows.append(result)
            print(json.dumps(result), flush=True)
    _table(rows)
    print("- recall@20: of the 2,000 evenly spaced queries' exact 20 nearest (the query first);")
    print("  identity / outlier: over the queries of an identity / over the outliers, whose")
    print("  exact neighbours are random rows at near-equal similarity")
    print("- ARI: adjusted Rand index, outliers as singletons; load = `uptime` at the row's start")


if __name__ == "__main__":
    run(main)
