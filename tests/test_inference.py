"""From a trained run to use: the Embedder API, python -m jaxreid.extract and
python -m jaxreid.search, their bad input, and evaluating a supervised model
on another dataset (its classifier is for training only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny_config, tiny_data

from jaxreid.utils import UserError


def _folder(tiny_root, tmp_path, count=6):
    """A nested folder of the tiny set's gallery images, plus one corrupt file."""
    source = os.path.join(tiny_root, "bounding_box_test")
    names = sorted(os.listdir(source))[:count]
    folder = tmp_path / "crops"
    for i, name in enumerate(names):
        target = folder / f"cam{i % 2}" / "day1"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(source, name), target / name)
    (folder / "cam0" / "broken.jpg").write_bytes(b"not an image")
    return str(folder), names


def _cli(module, *args):
    return subprocess.run(
        [sys.executable, "-m", f"jaxreid.{module}", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_embedder_matches_evaluation_features(run_dir, tiny_root):
    from jaxreid.checkpoints import load_model_for_eval
    from jaxreid.evaluate.protocol import extract
    from jaxreid.inference import Embedder, read_run_config

    embedder = Embedder.from_workdir(run_dir)
    config = read_run_config(run_dir)
    data = tiny_data(config)
    paths = data.gallery.paths[:5]
    from_paths = embedder.embed(paths)
    from_arrays = embedder.embed(data.gallery.images[:5])
    graphdef, params, stats, _ = load_model_for_eval(
        config, os.path.join(run_dir, "checkpoints", "latest")
    )
    reference = extract(graphdef, params, stats, data.gallery.images[:5], 32)
    for key in ("global", "stripes"):
        np.testing.assert_array_equal(from_paths[key], from_arrays[key])
        np.testing.assert_allclose(from_arrays[key], reference[key], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(from_paths["global"], axis=1), 1.0, atol=1e-5)
    # Another input size is resized to the model's.
    bigger = np.repeat(np.repeat(data.gallery.images[:2], 2, axis=1), 2, axis=2)
    assert embedder.embed(bigger)["global"].shape == from_paths["global"][:2].shape


def test_extract_and_search_a_folder(run_dir, tiny_root, tmp_path):
    folder, names = _folder(tiny_root, tmp_path)
    out = str(tmp_path / "crops.npz")
    extracted = _cli("extract", f"--workdir={run_dir}", f"--images={folder}", f"--out={out}")
    assert extracted.returncode == 0, extracted.stderr[-2000:]
    assert "skipped 1 unreadable image(s) of 7" in extracted.stdout
    assert "broken.jpg" in extracted.stdout
    with np.load(out) as data:
        paths = [str(p) for p in data["paths"]]
        assert len(paths) == 6 and all(p.startswith("cam") for p in paths)
        features = data["global"]
    query = paths[0]
    picture = str(tmp_path / "result.png")
    found = _cli(
        "search", f"--features={out}", f"--query={query}", "--top=3", f"--picture={picture}"
    )
    assert found.returncode == 0, found.stderr[-2000:]
    lines = [ln.split() for ln in found.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 3 and query not in [ln[2] for ln in lines]
    # The ranking is the cosine distance of the stored features.
    distance = 1 - features[1:] @ features[0]
    expected = [paths[1 + i] for i in np.argsort(distance, kind="stable")[:3]]
    assert [ln[2] for ln in lines] == expected
    assert os.path.getsize(picture) > 1000
    # A new image as the query: embedded with the run's model.
    image = os.path.join(folder, query)
    fresh = _cli(
        "search", f"--features={out}", f"--query={image}", "--top=2", f"--workdir={run_dir}"
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert fresh.stdout.split()[2] == query  # itself, at distance ~0


def test_bad_input_is_one_line(run_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.jpg").write_bytes(b"")
    cases = [
        (
            "extract",
            [f"--workdir={run_dir}", f"--images={empty}", f"--out={tmp_path}/x.npz"],
            "no images under",
        ),
        (
            "extract",
            [f"--workdir={tmp_path}", f"--images={one}", f"--out={tmp_path}/x.npz"],
            "config.json",
        ),
    ]
    no_paths = str(tmp_path / "nopaths.npz")
    np.savez(no_paths, global_features=np.zeros((2, 4)))
    cases.append(("search", [f"--features={no_paths}", "--query=a.jpg"], "paths"))
    for module, args, words in cases:
        result = _cli(module, *args)
        assert result.returncode == 2, (module, args, result.stderr[-1000:])
        assert words in result.stderr and "Traceback" not in result.stderr
    # A run folder without checkpoints.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(run_dir, "config.json"), bare / "config.json")
    from jaxreid.inference import Embedder

    with pytest.raises(UserError, match="does not exist|holds no checkpoint"):
        Embedder.from_workdir(str(bare))


def test_supervised_checkpoint_evaluates_on_another_dataset(tiny_root, tmp_path):
    from jaxreid.data import synthetic
    from jaxreid.evaluate.protocol import run_eval
    from jaxreid.train import train_and_evaluate

    config = tiny_config(
        tiny_root,
        **{
            "method.name": "supervised",
            "model.head": "bnneck",
            "train.num_instances": 2,
            "train.epochs": 1,
            "train.steps_per_epoch": 2,
        },
    )
    workdir = str(tmp_path / "sup")
    train_and_evaluate(config, workdir, tiny_data(config), log=lambda s: None)
    other = str(tmp_path / "other")
    synthetic.generate(other, num_ids=10, num_cameras=2, images_per_id_per_camera=2, seed=9)
    config.data.root = other
    result = run_eval(config, workdir, tiny_data(config), log=lambda s: None)
    assert "step 2" in result["source"]
    assert 0 <= result["eval"]["plain"]["mAP"] <= 1
