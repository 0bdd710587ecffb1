"""Property-based test of `python -m jaxreid.evaluate`'s input checks
(hypothesis): random shapes, dtypes, NaN / inf / zero / huge rows, empty
splits, label arrays of other kinds, every distance and re-ranking. Every
file either is refused with the library's own error (cli.InputError, one
line) or gives metrics that are finite and in [0, 1]; never another
exception, never NaN metrics. Derandomised (the same examples every run) and
without an example database, so the suite writes nothing and depends on no
earlier run."""

from __future__ import annotations

import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="pip install -r requirements-test.txt")
from hypothesis import event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jaxreid.command_line import parse  # noqa: E402
from jaxreid.evaluate import cli  # noqa: E402

LABEL_DTYPES = (np.int32, np.uint8, np.float32, np.bool_)
SPECIAL = (0.0, np.nan, np.inf, -np.inf, 1e30, 1e-30)


FAULTS = (
    None,
    None,
    None,
    None,
    None,
    "special",
    "zero row",
    "dtype",
    "width",
    "dims",
    "empty",
    "labels",
)


def _values(draw, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape))
    # Away from 0: zero rows are a fault of their own.
    values = st.lists(st.floats(0.25, 3, width=32), min_size=size, max_size=size)
    return np.asarray(draw(values), np.float64).reshape(shape)


@st.composite
def evaluate_inputs(draw) -> tuple[dict[str, np.ndarray], list[str]]:
    """(the arrays of an npz, the flags after --features): ordinary random
    arrays and settings, then at most one fault (FAULTS) on a random side."""
    fault = draw(st.sampled_from(FAULTS))
    side = draw(st.sampled_from(["query", "gallery"]))
    rows = {"query": draw(st.integers(1, 5)), "gallery": draw(st.integers(2, 10))}
    dims = dict.fromkeys(rows, draw(st.integers(1, 6)))
    if fault == "empty":
        rows[side] = 0
    if fault == "width":
        dims = dict.fromkeys(rows, 0)
    if fault == "dims":
        dims[side] += draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["cosine", "euclidean", "scl", "rerank"]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    arrays = {}
    for name in ("query", "gallery"):
        features = _values(draw, (rows[name], dims[name]))
        pid = st.sampled_from([1, 2, 0, -1])  # 0: distractor, -1: junk
        pids = draw(st.lists(pid, min_size=rows[name], max_size=rows[name]))
        cams = draw(st.lists(st.integers(0, 2), min_size=rows[name], max_size=rows[name]))
        arrays[f"{name}_features"] = features
        arrays[f"{name}_pids"] = np.asarray(pids, np.int64)
        arrays[f"{name}_cams"] = np.asarray(cams, np.int64)
        if kind == "scl":
            arrays[f"{name}_stripes"] = _values(draw, (rows[name], 2, max(dims[name] // 2, 1)))
    names = ["features", "stripes"] if kind == "scl" else ["features"]
    target = f"{side}_{draw(st.sampled_from(names))}"
    if fault == "special" and arrays[target].size:
        flat = arrays[target].reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(SPECIAL))
    if fault == "zero row" and len(arrays[target]):
        arrays[target][draw(st.integers(0, len(arrays[target]) - 1))] = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for name in [k for k in arrays if k.endswith(("features", "stripes"))]:
            arrays[name] = arrays[name].astype(dtype)
    if fault == "dtype":
        arrays[f"{side}_features"] = arrays[f"{side}_features"].astype(
            draw(st.sampled_from([np.int32, np.complex64, np.bool_]))
        )
    if fault == "labels":
        key = f"{side}_{draw(st.sampled_from(['pids', 'cams']))}"
        arrays[key] = arrays[key].astype(draw(st.sampled_from(LABEL_DTYPES)))
    flags = ["--max-rank", str(draw(st.integers(1, 12)))]
    if kind == "rerank":
        flags += ["--rerank", "--k1", str(draw(st.integers(1, 6))), "--k2", "2"]
    else:
        flags += ["--distance", kind]
    return arrays, flags


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("property")


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(case=evaluate_inputs())
def test_evaluate_refuses_cleanly_or_gives_finite_metrics(case, folder):
    arrays, flags = case
    path = os.path.join(folder, "features.npz")
    np.savez(path, **arrays)
    args, _ = parse(cli.define_flags, ["--features", path, *flags], cli.PROG)
    try:
        result, _ = cli.evaluate_file(args)
    except cli.InputError as e:
        message = str(e)
        assert message and "\n" not in message
        event("refused: " + message.split(": ", 1)[-1][:30])
        return
    event("evaluated")
    for key in ("mAP", "rank1", "rank5", "rank10"):
        assert 0 <= result[key] <= 1, (key, result[key])
    assert np.all(np.isfinite(result["cmc"])) and np.all(
        (0 <= result["cmc"]) & (result["cmc"] <= 1)
    )
    assert 1 <= result["num_valid_queries"] <= result["num_queries"] == len(arrays["query_pids"])
