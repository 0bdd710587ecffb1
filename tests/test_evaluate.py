"""Tests for jaxreid.evaluate: metrics, distances, extraction, CLI and pictures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import eval_arrays

from jaxreid import evaluate
from jaxreid.evaluate import cli, distances, plots

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


def test_hand_computed_three_queries():
    # Gallery (index: pid, camera):
    #   g0: 1,0   g1: 1,1   g2: 2,0   g3: 2,1   g4: 0,1 (distractor)   g5: 3,1   g6: 2,2
    gallery_pids = np.array([1, 1, 2, 2, 0, 3, 2])
    gallery_cams = np.array([0, 1, 0, 1, 1, 1, 2])
    query_pids = np.array([1, 2, 3])
    query_cams = np.array([0, 1, 1])
    distmat = np.array(
        [
            [0.1, 0.5, 0.2, 0.3, 0.4, 0.6, 0.7],
            [0.3, 0.3, 0.2, 0.1, 0.05, 0.9, 0.3],
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.6],
        ],
        np.float32,
    )
    # q0 (pid 1, cam 0): sorted g0 g2 g3 g4 g1 g5 g6; g0 is pid 1 cam 0 -> removed.
    #   kept: g2 g3 g4 g1 g5 g6 -> the only match g1 is at rank 4.
    #   AP = (1/4) / 1 = 0.25; first match at rank 4.
    # q1 (pid 2, cam 1): sorted g4(.05) g3(.1) g2(.2) g0 g1 g6 (tie .3, by index) g5(.9);
    #   g3 is pid 2 cam 1 -> removed. kept: g4 g2 g0 g1 g6 g5.
    #   g4 is a distractor (wrong) at rank 1, matches g2 at rank 2 and g6 at rank 5.
    #   AP = (1/2 + 2/5) / 2 = 0.45; first match at rank 2.
    #   (Had the tie put g6 before g0, g1, AP would be (1/2 + 2/3) / 2.)
    # q2 (pid 3, cam 1): its only gallery image g5 is camera 1 -> removed; no valid
    #   match, excluded from the averages.
    # mAP = (0.25 + 0.45) / 2 = 0.35.
    # CMC over first-match ranks {4, 2}: r1 0, r2 .5, r3 .5, r4..r10 1.
    result = evaluate.evaluate_ranking(
        distmat, query_pids, gallery_pids, query_cams, gallery_cams, max_rank=10
    )
    assert result["mAP"] == pytest.approx(0.35, abs=1e-12)
    np.testing.assert_allclose(result["cmc"], [0, 0.5, 0.5, 1, 1, 1, 1, 1, 1, 1])
    assert result["rank1"] == 0.0
    assert result["rank5"] == 1.0
    assert result["rank10"] == 1.0
    assert result["num_queries"] == 3
    assert result["num_valid_queries"] == 2


def _reference_ranking(distmat, qp, gp, qc, gc, max_rank):
    """Plain per-query loops: sort by (distance, index), filter, walk the list."""
    aps, first_ranks = [], []
    for i in range(len(qp)):
        order = sorted(range(len(gp)), key=lambda j: (float(distmat[i][j]), j))
        kept = [j for j in order if gp[j] != -1 and not (gp[j] == qp[i] and gc[j] == qc[i])]
        hits, precisions = 0, []
        for rank, j in enumerate(kept, start=1):
            if gp[j] == qp[i]:
                hits += 1
                precisions.append(hits / rank)
                if hits == 1:
                    first_ranks.append(rank)
        if precisions:
            aps.append(sum(precisions) / len(precisions))
    cmc = [sum(1 for f in first_ranks if f <= r) / len(first_ranks) for r in range(1, 1 + max_rank)]
    return sum(aps) / len(aps), cmc, len(aps)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    num_query, num_gallery = rng.integers(5, 30), rng.integers(10, 60)
    gallery_pids = rng.integers(-1, 6, num_gallery)  # includes junk (-1) and distractors (0)
    gallery_cams = rng.integers(0, 3, num_gallery)
    query_pids = rng.integers(1, 6, num_query)
    query_cams = rng.integers(0, 3, num_query)
    # Few distinct values: many ties and duplicate distances.
    distmat = rng.integers(0, 4, (num_query, num_gallery)).astype(np.float32) / 4
    # A tiny budget forces one query per chunk in half the cases.
    budget = 1 if seed % 2 else evaluate.DEFAULT_MAX_BLOCK_BYTES
    result = evaluate.evaluate_ranking(
        distmat,
        query_pids,
        gallery_pids,
        query_cams,
        gallery_cams,
        max_rank=12,
        max_block_bytes=budget,
    )
    mean_ap, cmc, num_valid = _reference_ranking(
        distmat.tolist(),
        query_pids.tolist(),
        gallery_pids.tolist(),
        query_cams.tolist(),
        gallery_cams.tolist(),
        12,
    )
    assert result["num_valid_queries"] == num_valid > 0
    assert result["mAP"] == pytest.approx(mean_ap, abs=1e-12)
    np.testing.assert_allclose(result["cmc"], cmc, atol=1e-12)
    assert (result["rank1"], result["rank5"], result["rank10"]) == pytest.approx(
        (cmc[0], cmc[4], cmc[9])
    )


def test_protocol_filtering():
    query = dict(query_pids=np.array([5]), query_cams=np.array([0]))
    # Same id + same camera at distance 0 is removed; same id other camera kept.
    r = evaluate.evaluate_ranking(
        np.array([[0.0, 1.0]]),
        gallery_pids=np.array([5, 5]),
        gallery_cams=np.array([0, 1]),
        **query,
    )
    assert (r["mAP"], r["rank1"]) == (1.0, 1.0)
    # A distractor (pid 0) ahead of the match is a wrong answer.
    r = evaluate.evaluate_ranking(
        np.array([[0.0, 1.0, 0.5]]),
        gallery_pids=np.array([5, 5, 0]),
        gallery_cams=np.array([0, 1, 1]),
        **query,
    )
    assert (r["mAP"], r["rank1"], r["cmc"][1]) == (0.5, 0.0, 1.0)
    # Gallery pid -1 (junk) is ignored wherever it ranks.
    r = evaluate.evaluate_ranking(
        np.array([[0.0, 1.0, 0.5]]),
        gallery_pids=np.array([5, 5, -1]),
        gallery_cams=np.array([0, 1, 1]),
        **query,
    )
    assert (r["mAP"], r["rank1"]) == (1.0, 1.0)


def test_queries_without_valid_match_are_excluded_and_counted():
    r = evaluate.evaluate_ranking(
        np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]),
        query_pids=np.array([1, 2, 3]),
        query_cams=np.array([0, 0, 0]),
        gallery_pids=np.array([1, 2]),
        gallery_cams=np.array([1, 0]),
    )
    # q0 finds g0 at rank 1; q1's only image is same-camera; q2's pid is absent.
    assert (r["num_queries"], r["num_valid_queries"]) == (3, 1)
    assert (r["mAP"], r["rank1"]) == (1.0, 1.0)
    none = evaluate.evaluate_ranking(
        np.zeros((1, 1)), np.array([1]), np.array([2]), np.array([0]), np.array([0])
    )
    assert none["num_valid_queries"] == 0 and np.isnan(none["mAP"])


def test_ranked_gallery_order():
    order = evaluate.ranked_gallery(
        np.array([0.2, 0.1, 0.2, 0.0, 0.1]),
        7,
        0,
        gallery_pids=np.array([7, 7, 3, 7, -1]),
        gallery_cams=np.array([1, 0, 0, 1, 1]),
    )
    np.testing.assert_array_equal(order, [3, 0, 2])  # g1 same cam, g4 junk; tie by index


def test_evaluate_ranking_rejects_bad_shapes():
    with pytest.raises(ValueError, match="distmat has shape"):
        evaluate.evaluate_ranking(np.zeros((2, 3)), [1], [1, 2, 3], [0], [0, 0, 0])


# ----------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------


def _features(rng, n, d):
    return rng.normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("budget", [1, 64, 1000, evaluate.DEFAULT_MAX_BLOCK_BYTES])
def test_cosine_and_euclidean_blocked_equal_brute_force(budget):
    rng = np.random.default_rng(0)
    q, g = _features(rng, 7, 5), _features(rng, 11, 5)
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    qn = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    gn = g64 / np.linalg.norm(g64, axis=1, keepdims=True)
    cos = evaluate.cosine_distance(q, g, max_block_bytes=budget)
    assert cos.dtype == np.float32 and cos.shape == (7, 11)
    np.testing.assert_allclose(cos, 1 - qn @ gn.T, atol=1e-6)
    euc = evaluate.euclidean_distance(q, g, max_block_bytes=budget)
    brute = np.sqrt(((q64[:, None] - g64[None]) ** 2).sum(-1))
    assert euc.dtype == np.float32
    np.testing.assert_allclose(euc, brute, atol=1e-5)
    unblocked = evaluate.euclidean_distance(q, g, max_block_bytes=2**40)
    np.testing.assert_allclose(euc, unblocked, atol=1e-6)


def test_euclidean_of_identical_rows_is_zero_not_nan():
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(evaluate.euclidean_distance(x, x), np.zeros((2, 2)))


@pytest.mark.parametrize(
    "rows,cols,element_bytes,budget",
    [(7, 11, 4, 1), (7, 11, 4, 44), (7, 11, 12, 100), (20000, 20000, 4, 2**28), (3, 5, 4, 10**9)],
)
def test_tiles_partition_and_respect_budget(rows, cols, element_bytes, budget):
    covered = 0
    for r, c in distances._tiles(rows, cols, element_bytes, budget):
        size = (r.stop - r.start) * (c.stop - c.start)
        assert size * element_bytes <= max(budget, element_bytes)
        covered += size
    assert covered == rows * cols


@pytest.mark.parametrize("budget", [1, 200, evaluate.DEFAULT_MAX_BLOCK_BYTES])
def test_scl_distance_matches_direct_formula(budget):
    rng = np.random.default_rng(1)
    num_q, num_g, num_stripes, dim = 5, 8, 3, 4
    qg, gg = _features(rng, num_q, 6), _features(rng, num_g, 6)
    qs = rng.normal(size=(num_q, num_stripes, dim)).astype(np.float32)
    gs = rng.normal(size=(num_g, num_stripes, dim)).astype(np.float32)
    qc, gc = rng.integers(0, 2, num_q), rng.integers(0, 2, num_g)
    lam_g, lam_c = 0.3, 0.07
    expected = np.zeros((num_q, num_g))
    for i in range(num_q):
        for j in range(num_g):
            stripe_mean = np.mean(
                [np.linalg.norm(qs[i, p].astype(np.float64) - gs[j, p]) for p in range(num_stripes)]
            )
            expected[i, j] = (
                lam_g * np.linalg.norm(qg[i].astype(np.float64) - gg[j])
                + (1 - lam_g) * stripe_mean
                + lam_c * (qc[i] == gc[j])
            )
    got = evaluate.scl_distance(
        qg, gg, qs, gs, qc, gc, lam_g=lam_g, lam_c=lam_c, max_block_bytes=budget
    )
    assert got.dtype == np.float32 and got.shape == (num_q, num_g)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ----------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------

_H, _W, _DIM = 4, 2, 6


def _linear_apply(weights):
    def apply_fn(images):
        flat = images.reshape(images.shape[0], -1) @ weights
        return {"global": flat, "stripes": flat.reshape(-1, 2, _DIM // 2)}

    return apply_fn


def _numpy_linear(images, weights):
    flat = images.reshape(len(images), -1).astype(np.float64) @ weights
    return {"global": flat, "stripes": flat.reshape(-1, 2, _DIM // 2)}


def _normalise(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _extraction_inputs():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, _H, _W, 3), dtype=np.uint8)
    weights = rng.normal(size=(_H * _W * 3, _DIM)).astype(np.float32) / 100
    return images, weights


def test_extract_features_matches_numpy_with_padding():
    images, weights = _extraction_inputs()
    out = evaluate.extract_features(_linear_apply(weights), images, batch_size=4, progress=False)
    expected = _numpy_linear(images, weights)
    assert set(out) == {"global", "stripes"}
    assert out["global"].shape == (11, _DIM) and out["stripes"].shape == (11, 2, _DIM // 2)
    for key in expected:
        np.testing.assert_allclose(out[key], expected[key], rtol=1e-5, atol=1e-5)


def test_extract_features_into_a_memory_map_is_the_same(tmp_path):
    images, weights = _extraction_inputs()
    in_memory = evaluate.extract_features(_linear_apply(weights), images, 4, progress=False)
    mapped = evaluate.extract_features(
        _linear_apply(weights), images, 4, progress=False, memmap_dir=str(tmp_path)
    )
    for key, value in in_memory.items():
        assert isinstance(mapped[key], np.memmap)
        assert mapped[key].tobytes() == value.tobytes()
        np.testing.assert_array_equal(np.load(tmp_path / f"{key}.npy"), value)


def test_extract_features_flip_average_and_params_argument():
    images, weights = _extraction_inputs()

    def apply_with_params(params, x):
        return _linear_apply(params)(x)

    out = evaluate.extract_features(
        apply_with_params, images, batch_size=3, flip=True, params=weights, progress=False
    )
    plain, mirrored = _numpy_linear(images, weights), _numpy_linear(images[:, :, ::-1], weights)
    for key in plain:
        # Per key; stripes are normalised stripe by stripe.
        expected = _normalise((plain[key] + mirrored[key]) / 2)
        np.testing.assert_allclose(out[key], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out["stripes"], axis=-1), 1.0, rtol=1e-5)


def test_extract_features_empty_and_bad_input():
    images, weights = _extraction_inputs()
    out = evaluate.extract_features(_linear_apply(weights), images[:0], 4, progress=False)
    assert out["global"].shape == (0, _DIM) and out["stripes"].shape == (0, 2, _DIM // 2)
    with pytest.raises(TypeError, match="uint8"):
        evaluate.extract_features(_linear_apply(weights), images.astype(np.float32), 4)


def _subprocess_env(**extra):
    env = dict(os.environ)
    # tests/ too: the scripts import tests.test_evaluate, which imports helpers.
    paths = [REPO_ROOT, os.path.join(REPO_ROOT, "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def test_extract_features_four_devices_equals_one(tmp_path):
    images, weights = _extraction_inputs()
    np.savez(tmp_path / "inputs.npz", images=images, weights=weights)
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        assert len(jax.devices()) == 4, jax.devices()
        from jaxreid.evaluate import extract_features
        import tests.test_evaluate as t
        inputs = np.load({str(tmp_path / "inputs.npz")!r})
        # batch_size 6 -> 4 (a multiple of 4 devices); 11 images -> 3 batches, 1 padded.
        out = extract_features(t._linear_apply(inputs["weights"]), inputs["images"], 6,
                               flip=True, progress=False)
        np.savez({str(tmp_path / "four.npz")!r}, **out)
        """
    )
    env = _subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    four = np.load(tmp_path / "four.npz")
    one = evaluate.extract_features(
        _linear_apply(weights), images, batch_size=6, flip=True, progress=False
    )
    for key in one:
        np.testing.assert_allclose(four[key], one[key], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jaxreid.evaluate", *args],
        cwd=REPO_ROOT,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_json_success(tmp_path):
    arrays = eval_arrays()
    path = str(tmp_path / "f.npz")
    np.savez(path, **arrays)
    proc = _run_cli("--features", path, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert list(result) == list(cli.JSON_KEYS)
    expected = evaluate.evaluate_ranking(
        evaluate.cosine_distance(arrays["query_features"], arrays["gallery_features"]),
        arrays["query_pids"],
        arrays["gallery_pids"],
        arrays["query_cams"],
        arrays["gallery_cams"],
    )
    for key in cli.JSON_KEYS:
        assert result[key] == pytest.approx(expected[key])
    assert result["num_queries"] == 6 and result["num_valid_queries"] == 6


def test_cli_table_and_scl_in_process(tmp_path, capsys):
    arrays = eval_arrays()
    path = str(tmp_path / "f.npz")
    np.savez(path, **arrays)
    assert cli.main(["--features", path, "--distance", "scl", "--lam-c", "0.1"]) == 0
    table = capsys.readouterr().out
    assert "mAP" in table and "rank-10" in table and "lam_c=0.1" in table
    assert cli.main(["--features", path, "--distance", "euclidean", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["mAP"] <= 1


def _bad_inputs(tmp_path):
    """(name, argv, substring of the message) per bad input."""
    cases = []

    def npz(name, **changes):
        arrays = eval_arrays(with_stripes=False)
        arrays.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del arrays[key]
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, **arrays)
        return path

    text = tmp_path / "text.npz"
    text.write_text("not an archive\n")
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    nan = eval_arrays(with_stripes=False)["gallery_features"].copy()
    nan[[1, 4], 0] = np.nan
    nan[4, 1] = np.inf
    cases += [
        ("missing file", [str(tmp_path / "absent.npz")], "no such file"),
        ("not an npz", [str(text)], "not a readable .npz"),
        ("single npy", [str(npy)], "single .npy"),
        (
            "missing keys",
            [npz("missing", query_cams=None, gallery_pids=None)],
            "missing keys gallery_pids, query_cams",
        ),
        ("lengths", [npz("lengths", query_pids=np.arange(1, 5))], "differ in length"),
        ("ndim", [npz("ndim", query_features=np.zeros((6, 2, 4), np.float32))], "must be 2-d"),
        (
            "dims",
            [npz("dims", gallery_features=np.zeros((18, 5), np.float32))],
            "differ in feature shape",
        ),
        ("nan", [npz("nan", gallery_features=nan)], "has 2 of 18 rows with NaN/inf"),
        ("scl stripes", [npz("nostripes"), "--distance", "scl"], "--distance scl needs"),
        ("rerank scl", [npz("rr"), "--rerank", "--distance", "scl"], "drop --distance scl"),
    ]
    return cases


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path):
    cases = _bad_inputs(tmp_path)
    # Launch all at once: each process is dominated by interpreter start-up.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxreid.evaluate", "--features", *argv],
            cwd=REPO_ROOT,
            env=_subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _, argv, _ in cases
    ]
    for (name, argv, expected), proc in zip(cases, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, stderr)
        assert "Traceback" not in stderr, name
        assert stderr.count("\n") == 1 and stderr.endswith("\n"), (name, stderr)
        assert expected in stderr, (name, stderr)
        assert os.path.basename(argv[0]) in stderr, (name, stderr)
        assert stdout == "", name


def test_cli_rerank_success(tmp_path):
    path = str(tmp_path / "f.npz")
    np.savez(path, **eval_arrays())
    proc = _run_cli("--features", path, "--json", "--rerank", "--k1", "4", "--k2", "2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert 0 <= result["mAP"] <= 1 and result["num_valid_queries"] == 6


# ----------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------


def test_ranked_list_grid_borders(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    colours = {}

    def solid(name, rgb):
        path = str(tmp_path / f"{name}.png")
        image_module.new("RGB", (32, 64), rgb).save(path)
        colours[path] = rgb
        return path

    query_paths = [solid("q0", (10, 10, 10)), solid("q1", (20, 20, 20))]
    gallery_paths = [solid(f"g{j}", (100 + 10 * j, 50, 50)) for j in range(4)]
    gallery_pids = np.array([1, 1, 2, 1])
    gallery_cams = np.array([0, 1, 1, 1])
    distmat = np.array([[0.0, 0.3, 0.1, 0.2], [0.4, 0.3, 0.2, 0.1]])
    out = str(tmp_path / "grid.png")
    plots.ranked_list_grid(
        distmat,
        query_paths,
        gallery_paths,
        np.array([1, 2]),
        gallery_pids,
        np.array([0, 1]),
        gallery_cams,
        query_indices=[0, 1],
        out_path=out,
        top_k=3,
    )
    grid = image_module.open(out).convert("RGB")
    assert grid.size == plots.grid_size(2, 3)

    def border(row, column):
        x, y = plots.cell_origin(row, column)
        return grid.getpixel((x + 1, y + 1))

    def centre(row, column):
        x, y = plots.cell_origin(row, column)
        return grid.getpixel((x + plots.BORDER + 10, y + plots.BORDER + 10))

    # Query 0 (pid 1, cam 0): g0 (same id, same cam) removed; ranked g2 (pid 2, red),
    # g3 (pid 1, green), g1 (pid 1, green).
    assert border(0, 0) == plots.QUERY_COLOUR and centre(0, 0) == (10, 10, 10)
    assert [border(0, k) for k in (1, 2, 3)] == [
        plots.MISMATCH_COLOUR,
        plots.MATCH_COLOUR,
        plots.MATCH_COLOUR,
    ]
    assert [centre(0, k) for k in (1, 2, 3)] == [(120, 50, 50), (130, 50, 50), (110, 50, 50)]
    # Query 1 (pid 2, cam 1): g2 removed; g3, g1, g0, all red.
    assert [border(1, k) for k in (1, 2, 3)] == [plots.MISMATCH_COLOUR] * 3
    assert [centre(1, k) for k in (1, 2, 3)] == [(130, 50, 50), (110, 50, 50), (100, 50, 50)]


def test_cmc_curve_plot(tmp_path):
    pytest.importorskip("matplotlib")
    image_module = pytest.importorskip("PIL.Image")
    out = str(tmp_path / "cmc.png")
    plots.cmc_curve_plot(
        {"cosine": np.linspace(0.5, 0.9, 10), "scl": np.linspace(0.6, 0.95, 10)}, out
    )
    with image_module.open(out) as image:
        assert image.format == "PNG" and image.size == (500, 400)


def test_camera_centred_ranking_removes_a_camera_offset():
    """Cameras 0 and 2 share a style s, camera 1 has style t (e_i, s, t
    orthonormal, style weight 3). Queries: persons 0, 1 in camera 0; gallery:
    persons 0, 1 in camera 1 and strangers 2, 3 in camera 2. Plain cosine
    (all norms sqrt(10)): a query scores 9 with both strangers, 1 with its own
    person, so its match is third: AP 1/3. Each camera's mean removed, query
    0 is (e0 - e1)/2, its match the same, person 1 the opposite, the strangers
    orthogonal: AP 1."""
    from jaxreid.config_base import base_config
    from jaxreid.evaluate.protocol import evaluate_features

    e0, e1, e2, e3, s, t = np.eye(6)
    q = np.stack([e0 + 3 * s, e1 + 3 * s]).astype(np.float32)
    g = np.stack([e0 + 3 * t, e1 + 3 * t, e2 + 3 * s, e3 + 3 * s]).astype(np.float32)
    data = SimpleNamespace(
        query=SimpleNamespace(pids=np.array([0, 1]), cameras=np.array([0, 0])),
        gallery=SimpleNamespace(pids=np.array([0, 1, 2, 3]), cameras=np.array([1, 1, 2, 2])),
    )
    config = base_config()
    config.eval.camera_centering = True
    results = evaluate_features(config, {"global": q}, {"global": g}, data)
    assert results["plain"]["mAP"] == pytest.approx(1 / 3)
    assert results["plain"]["rank1"] == 0.0
    assert results["centred"]["mAP"] == pytest.approx(1.0)
    config.eval.camera_centering = False
    assert "centred" not in evaluate_features(config, {"global": q}, {"global": g}, data)


def _two_camera_pairs(seed: int = 0):
    """Cameras 0-1 see persons 0..19, cameras 2-3 persons 20..39 (one image per
    camera). Camera 1 adds a style offset b (|b| = 0.4), and persons 20..24 are
    look-alikes of persons 0..4 (centre + an offset of norm 0.25), each image
    with noise 0.03 per dimension (32-d). A query of person p < 5 (camera 0)
    is then nearer its look-alike in camera 3 (about 0.35) than its own image
    in camera 1 (about 0.47): plain AP 1/2. The look-alikes' own cameras 2-3
    are nearer each other (0.24), so camera 0 shares no mutual nearest pair
    with cameras 2-3, and A is 1 within a pair and 0 across."""
    rng = np.random.default_rng(seed)
    dim = 32
    centres = rng.standard_normal((40, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    offsets = rng.standard_normal((5, dim))
    centres[20:25] = centres[:5] + 0.25 * offsets / np.linalg.norm(offsets, axis=1, keepdims=True)
    style = rng.standard_normal(dim)
    style *= 0.4 / np.linalg.norm(style)

    def images(people, with_style):
        x = centres[people] + 0.03 * rng.standard_normal((len(people), dim))
        return (x + style if with_style else x).astype(np.float32)

    first, second = np.arange(20), np.arange(20, 40)
    q = np.concatenate([images(first, False), images(second, False)])
    g = np.concatenate([images(first, True), images(second, False)])
    pids = np.concatenate([first, second])
    data = SimpleNamespace(
        query=SimpleNamespace(pids=pids, cameras=np.repeat([0, 2], 20)),
        gallery=SimpleNamespace(pids=pids, cameras=np.repeat([1, 3], 20)),
    )
    return q, g, data


def test_camera_affinity_ranking_drops_look_alikes_of_other_camera_pairs():
    from jaxreid.config_base import base_config
    from jaxreid.evaluate.protocol import evaluate_features

    q, g, data = _two_camera_pairs()
    config = base_config()
    assert "affinity" not in evaluate_features(config, {"global": q}, {"global": g}, data)
    config.eval.camera_affinity = 0.2
    results = evaluate_features(config, {"global": q}, {"global": g}, data)
    # Five of the 40 queries find their look-alike first: AP 1/2 each.
    assert results["plain"]["mAP"] == pytest.approx(1 - 5 * 0.5 / 40)
    assert results["plain"]["rank1"] == pytest.approx(35 / 40)
    # The affinity adds 0.2 (1 - 0) to every cross-pair distance: all first.
    assert results["affinity"]["mAP"] == pytest.approx(1.0)
    assert results["affinity"]["rank1"] == pytest.approx(1.0)
    # Re-ranked (k1 20 of 80 images: no longer worked out by hand; the exact
    # values are test_camera_affinity's dense reference): measured 0.870 plain,
    # 0.988 with the penalised similarity in the neighbour sets.
    config.eval.rerank = True
    results = evaluate_features(config, {"global": q}, {"global": g}, data)
    assert results["affinity"]["mAP"] > results["plain"]["mAP"] + 0.1


def test_camera_affinity_ranking_is_plain_where_all_cameras_share_people():
    """Query in camera 0, gallery in camera 1 only: A = 1, the distance is
    unchanged, and so is every metric."""
    from jaxreid.config_base import base_config
    from jaxreid.evaluate.protocol import evaluate_features

    q, g, data = _two_camera_pairs()
    q, g = q[:20], g[:20]
    data = SimpleNamespace(
        query=SimpleNamespace(pids=data.query.pids[:20], cameras=data.query.cameras[:20]),
        gallery=SimpleNamespace(pids=data.gallery.pids[:20], cameras=data.gallery.cameras[:20]),
    )
    config = base_config()
    config.eval.camera_affinity = 0.5
    results = evaluate_features(config, {"global": q}, {"global": g}, data)
    assert results["affinity"] == results["plain"]
