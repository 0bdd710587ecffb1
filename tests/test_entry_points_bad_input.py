"""Bad input to the tools beside training, one table per entry point: each
case is its input, exit status 2 (or, for the Python API, the exception) and
the words its one line must contain. The command-line tools run in process
(`main(argv)` parses its own flags), so a case costs no interpreter start-up;
the cases that need a trained model share the session's tiny run (`run_dir`).
Also: extraction over a tree of links with a cycle, the model record a
feature file carries, and search / evaluate refusing features of two models."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from helpers import eval_arrays, link_tree, random_embedder

from jaxreid import export, extract, search
from jaxreid.data.datasets import DataError, load_dataset
from jaxreid.evaluate import cli
from jaxreid.inference import RECORD_KEY, record_array
from jaxreid.utils import UserError


def _call(main, argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of an entry point's main(argv)."""
    try:
        code = main(argv)
    except SystemExit as e:  # flag errors: command_line.fail
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _refused(main, argv, words, capsys) -> str:
    code, out, err = _call(main, argv, capsys)
    lines = err.splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    for word in words:
        assert word in lines[0], (argv, word, lines[0])
    return lines[0]


# ---------------------------------------------------------------- evaluate


def _npz(tmp_path, name, **changes) -> str:
    arrays = eval_arrays(with_stripes=False)
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        elif callable(value):
            value(arrays[key])  # edits in place
        else:
            arrays[key] = value
    path = str(tmp_path / f"{name}.npz")
    np.savez(path, **arrays)
    return path


def _zero_rows(rows):
    def edit(a):
        a[rows] = 0

    return edit


def _set(index, value):
    def edit(a):
        a[index] = value

    return edit


MODEL_A = {"config": "aaaa", "step": 2, "weights": "1111"}
MODEL_B = {"config": "aaaa", "step": 4, "weights": "2222"}

# (name, flags after --features FILE, changes to the file, words of the line)
EVALUATE_CASES = [
    ("max rank 0", ["--max-rank", "0"], {}, ["--max-rank 0", ">= 1"]),
    ("k1 negative", ["--k1", "-5"], {}, ["--k1 -5", ">= 1"]),
    ("rerank k1 0", ["--rerank", "--k1", "0"], {}, ["--k1 0", "re-ranking", ">= 1"]),
    ("k2 0", ["--rerank", "--k2", "0"], {}, ["--k2 0", ">= 1"]),
    ("block bytes 0", ["--max-block-bytes", "0"], {}, ["--max-block-bytes 0"]),
    ("lambda nan", ["--rerank", "--lambda-value", "nan"], {}, ["--lambda-value nan", "finite"]),
    ("lambda above 1", ["--rerank", "--lambda-value", "2"], {}, ["--lambda-value 2", "[0, 1]"]),
    ("lam_g inf", ["--distance", "scl", "--lam-g", "inf"], {}, ["--lam-g inf", "finite"]),
    (
        "zero query rows",
        [],
        {"query_features": _zero_rows(slice(None))},
        ["query_features has 6 of 6 rows of zero norm"],
    ),
    (
        "one zero gallery row",
        [],
        {"gallery_features": _zero_rows(3)},
        ["gallery_features has 1 of 18 rows of zero norm"],
    ),
    (
        "nan query",
        [],
        {"query_features": _set((2, 5), np.nan)},
        ["query_features has 1 of 6 rows with NaN/inf"],
    ),
    (
        "inf gallery",
        ["--json"],
        {"gallery_features": _set((slice(0, 3), 0), np.inf)},
        ["gallery_features has 3 of 18 rows with NaN/inf"],
    ),
    (
        "overflowing distances",
        ["--distance", "euclidean"],
        {"gallery_features": _set((0, 0), np.float32(3e38))},
        ["distances are not finite", "rescale"],
    ),
    (
        "two models",
        [],
        {"query_model": record_array(MODEL_A), "gallery_model": record_array(MODEL_B)},
        ["come from two models", "step 2, weights 1111", "step 4, weights 2222"],
    ),
    ("no valid query", [], {"query_pids": np.full(6, 99)}, ["no query has a match"]),
]


@pytest.mark.parametrize("case", EVALUATE_CASES, ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_refuses(case, tmp_path, capsys):
    name, flags, changes, words = case
    path = _npz(tmp_path, name.replace(" ", "_"), **changes)
    line = _refused(cli.main, ["--features", path, *flags], words, capsys)
    assert line.startswith(f"{cli.PROG}: error: ")


def test_evaluate_notes_a_file_without_model_record(tmp_path, capsys):
    same = {"query_model": record_array(MODEL_A), "gallery_model": record_array(MODEL_A)}
    code, out, err = _call(cli.main, ["--features", _npz(tmp_path, "same", **same)], capsys)
    assert code == 0 and err == "" and "mAP" in out
    code, out, err = _call(cli.main, ["--features", _npz(tmp_path, "none"), "--json"], capsys)
    assert code == 0 and 0 <= json.loads(out)["mAP"] <= 1
    assert err.count("\n") == 1 and "record(s) no model" in err


# ---------------------------------------------------------------- extract


def test_extract_refuses(tmp_path, capsys):
    """Every case fails before a model is loaded (the workdir does not exist):
    --out is checked first."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = ["--out", str(tmp_path / "x.npz")]
    base = ["--workdir", str(tmp_path / "nowhere"), "--images", str(images)]
    cases = [
        ([*base, "--out", f"{a_file}/x.npz"], ["--out", "x.npz", "cannot be written"]),
        ([*base, "--out", str(empty)], ["--out", "is a folder"]),
        ([*base, *out, "--chunk", "0"], ["--chunk=0"]),
        (base, ["--out"]),
        (["--workdir", "w", "--images", str(empty), *out], ["no images under"]),
        (["--workdir", "w", "--images", str(a_file), *out], ["--images", "is not a folder"]),
        ([*base, *out], ["nowhere", "config.json"]),
    ]
    for argv, words in cases:
        _refused(extract.main, argv, words, capsys)
    assert sorted(os.listdir(tmp_path)) == ["empty", "file.txt", "images"]  # nothing written


def test_extract_follows_links_and_records_the_model(run_dir, tiny_root, tmp_path, capsys):
    """A tree of links with a cycle: every image once, the skipped links
    named; an --out without .npz is written and reported as numpy names it;
    the file records which model made the features."""
    root, names = link_tree(tiny_root, tmp_path)
    out = str(tmp_path / "features")
    code, stdout, err = _call(
        extract.main, ["--workdir", run_dir, "--images", root, "--out", out], capsys
    )
    assert code == 0, err
    assert f"wrote {out}.npz: 6 images" in stdout
    assert "skipped 2 link(s)" in stdout and "skipped 1 broken link(s)" in stdout
    with np.load(out + ".npz") as data:
        assert sorted(os.path.basename(str(p)) for p in data["paths"]) == sorted(names)
        record = json.loads(str(data[RECORD_KEY]))
    assert record["step"] == 2 and len(record["config"]) == len(record["weights"]) == 16
    from jaxreid.inference import Embedder

    assert Embedder.from_workdir(run_dir).record == record


# ---------------------------------------------------------------- search


@pytest.fixture(scope="module")
def extracted(run_dir, tiny_root, tmp_path_factory):
    """(features .npz of 4 gallery crops by run_dir's model, one of the crops,
    a copy of run_dir whose model differs by its config)."""
    # A folder of its own: xdist may build a module fixture twice in a worker.
    base = tmp_path_factory.mktemp("search")
    folder = base / "crops"
    folder.mkdir()
    source = os.path.join(tiny_root, "bounding_box_test")
    for name in sorted(os.listdir(source))[:4]:
        shutil.copy(os.path.join(source, name), folder / name)
    out = str(base / "crops.npz")
    assert extract.main(["--workdir", run_dir, "--images", str(folder), "--out", out]) == 0
    other = str(base / "other_run")
    shutil.copytree(run_dir, other)
    with open(os.path.join(other, "config.json")) as f:
        config = json.load(f)
    config["eval"]["flip"] = not config["eval"]["flip"]  # other features, same dimension
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(config, f)
    image = os.path.join(folder, sorted(os.listdir(folder))[0])
    return out, image, other


def test_search_refuses(extracted, run_dir, tmp_path, capsys):
    features, image, other = extracted
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    no_paths = str(tmp_path / "nopaths.npz")
    np.savez(no_paths, global_features=np.zeros((2, 4)))
    narrow = str(tmp_path / "narrow.npz")  # no model record, 5-d
    np.savez(narrow, paths=np.array(["a.jpg", "b.jpg"]), **{"global": np.ones((2, 5))})
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    query = ["--query", os.path.basename(image)]
    cases = [
        (["--features", features, *query, "--top", "0"], ["--top=0"]),
        (["--features", features, *query, "--top", "-3"], ["--top=-3"]),
        (["--features", str(text), *query], ["text.npz", "not a readable .npz"]),
        (["--features", str(npy), *query], ["single .npy"]),
        (["--features", str(tmp_path / "absent.npz"), *query], ["no such file"]),
        (["--features", no_paths, *query], ["paths"]),
        (
            ["--features", features, *query, "--picture", f"{a_file}/p.png"],
            ["--picture", "cannot be written"],
        ),
        (["--features", features, "--query", image + ".missing"], ["neither a path stored"]),
        (["--features", features, "--query", image], ["needs --workdir"]),
        (
            ["--features", narrow, "--query", image, "--workdir", run_dir],
            ["-d, the features", "5-d", "another model"],
        ),
        (
            ["--features", features, "--query", image, "--workdir", other],
            ["come from two models", "--workdir", "step 2"],
        ),
    ]
    for argv, words in cases:
        _refused(search.main, argv, words, capsys)


def test_search_query_from_the_same_model(extracted, run_dir, capsys):
    features, image, _ = extracted
    argv = ["--features", features, "--query", image, "--workdir", run_dir, "--top", "2"]
    code, out, err = _call(search.main, argv, capsys)
    assert code == 0 and err == "", err
    assert out.split()[2] == os.path.basename(image)  # itself, at distance ~0


# ---------------------------------------------------------------- export


def test_export_refuses(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["--workdir", str(tmp_path)], ["--out"]),
        (["--out", str(tmp_path / "m.onnx")], ["--workdir"]),
        (["--workdir", str(tmp_path), "--out", f"{a_file}/m.onnx"], ["--out", "cannot be written"]),
        (["--workdir", str(tmp_path), "--out", str(tmp_path)], ["--out", "is a folder"]),
        (["--workdir", str(tmp_path), "--out", str(tmp_path / "m.onnx")], ["config.json"]),
    ]
    for argv, words in cases:
        _refused(export.main, argv, words, capsys)
    assert not os.path.exists(tmp_path / "m.onnx")


# ---------------------------------------------------------------- Embedder


@pytest.fixture(scope="module")
def embedder():
    return random_embedder()


def test_embedder_refuses(embedder, tiny_root):
    image = os.path.join(
        tiny_root, "query", sorted(os.listdir(os.path.join(tiny_root, "query")))[0]
    )
    pixels = np.zeros((64, 32, 3), np.uint8)
    cases = [
        ([], UserError, "no images to embed"),
        (np.zeros((0, 64, 32, 3), np.uint8), UserError, "no images to embed"),
        (np.zeros((2, 0, 32, 3), np.uint8), UserError, "height or width 0"),
        ([image, pixels], UserError, "mix file paths and arrays"),
        ([pixels, image], UserError, "item 1 a str"),
        (np.zeros((2, 64, 32, 3), np.float32), UserError, "must be uint8"),
        (np.zeros((64, 32, 3), np.uint8), UserError, "(N, H, W, 3)"),
        ([[1, 2], [3]], UserError, "not one array"),
        ("missing.jpg", DataError, "missing.jpg"),
    ]
    for images, error, words in cases:
        with pytest.raises(error) as info:
            embedder.embed(images)
        assert words in str(info.value) and "\n" not in str(info.value), (words, info.value)


def test_embedder_takes_one_path_as_a_batch_of_one(embedder, tiny_root):
    folder = os.path.join(tiny_root, "query")
    paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder))[:2]]
    one = embedder.embed(paths[0])
    listed = embedder.embed(paths[:1])
    assert one["global"].shape == (1, 32)
    for key in one:
        np.testing.assert_array_equal(one[key], listed[key])
    # A list of arrays of any sizes: each resized to the model's input.
    images = [np.zeros((64, 32, 3), np.uint8), np.full((100, 40, 3), 128, np.uint8)]
    assert embedder.embed(images)["global"].shape == (2, 32)
    record = embedder.record
    assert record["step"] is None and record == random_embedder().record


# ---------------------------------------------------------------- datasets


def test_datasets_refuse(tiny_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    crops = tmp_path / "crops" / "cam1"
    crops.mkdir(parents=True)
    shutil.copy(
        os.path.join(tiny_root, "query", sorted(os.listdir(os.path.join(tiny_root, "query")))[0]),
        crops / "0001_c1.jpg",
    )
    crops = str(crops.parent)
    cases = [
        (("folder", str(tmp_path / "absent")), {}, "is not a folder"),
        (("folder", str(empty)), {}, "no images under"),
        (("folder", crops), {"folder_cameras": r"_x(\d+)"}, "finds no camera"),
        (("folder", crops), {"folder_cameras": r"(_x\d+)?_c"}, "first group must match"),
        (("folder", crops), {"folder_cameras": r"(unclosed"}, "not a valid regex"),
        (("nosuch", crops), {}, "unknown dataset 'nosuch'"),
        (("market_layout", str(empty)), {}, "missing bounding_box_train"),
        (("market1501", str(tmp_path / "absent")), {}, "does not exist"),
    ]
    for args, kwargs, words in cases:
        with pytest.raises(DataError) as info:
            load_dataset(*args, **kwargs)
        assert words in str(info.value) and "\n" not in str(info.value), (words, info.value)
