"""Dataset readers, stats CLI, bad input, decode cache, TFDS builders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxreid.data import DataError, dataset_stats, load_dataset
from jaxreid.data.images import decode_split

CUHK03 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cuhk03")


def _write_image(path, mode="RGB", size=(64, 128), seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


def make_market_tree(root, names_by_split):
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    for split, names in names_by_split.items():
        os.makedirs(os.path.join(root, folders[split]), exist_ok=True)
        for i, name in enumerate(names):
            _write_image(os.path.join(root, folders[split], name), seed=i)
    return root


MARKET_NAMES = {
    "train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c3s3_076469_02.png"],
    "query": ["0001_c1s1_001051_00.jpg", "0003_c6s1_012301_00.jpg"],
    "gallery": [
        "0001_c2s1_000301_01.jpg",
        "0001_c1s1_001151_01.jpg",
        "0003_c5s2_009901_02.jpg",
        "0000_c3s1_000001_05.jpg",  # distractor: kept
        "-1_c1s1_000401_03.jpg",  # junk: dropped
        "-1_c4s2_000101_01.jpg",  # junk: dropped
    ],
}


def test_market_parsing_junk_and_distractors(tmp_path):
    root = make_market_tree(str(tmp_path / "Market-1501-v15.09.15"), MARKET_NAMES)
    # The archive's own folder is found under the given root.
    dataset = load_dataset("market1501", str(tmp_path))
    assert dataset.root == root
    assert [r.pid for r in dataset.train] == [2, 2, 7]
    assert sorted(r.pid for r in dataset.gallery) == [0, 1, 1, 3]
    assert all(r.pid != -1 for r in dataset.gallery)
    # The dataset's camera numbers, 0-based (camera 4 appears only in junk).
    assert [r.camera for r in dataset.train] == [0, 1, 2]
    assert [r.camera for r in dataset.query] == [0, 5]
    assert dataset.num_cameras == 6
    assert [r.index for r in dataset.gallery] == [0, 1, 2, 3]
    stats = dataset_stats(dataset)
    assert stats["train"] == {"images": 3, "ids": 2, "cameras": 3}
    assert stats["gallery"] == {"images": 4, "ids": 3, "cameras": 4}


def test_multi_digit_cameras_and_duke_names(tmp_path):
    names = {
        "train": ["0003_c10_01.jpg", "0003_c2_06.jpg", "0005_c12_f0046182.jpg"],
        "query": ["0009_c1_00.jpg"],
        "gallery": ["0009_c11_05.jpg"],
    }
    dataset = load_dataset("market_layout", make_market_tree(str(tmp_path), names))
    cameras_by_name = {os.path.basename(r.path): r.camera for r in dataset.train}
    # Several digits parsed as numbers: c10 -> 9, c12 -> 11.
    assert cameras_by_name == {
        "0003_c10_01.jpg": 9,
        "0003_c2_06.jpg": 1,
        "0005_c12_f0046182.jpg": 11,
    }
    assert dataset.num_cameras == 12


def test_msmt17_v1_list_files(tmp_path):
    root = tmp_path / "MSMT17_V1"
    lists = {
        "list_train.txt": [("train", "0000/0000_000_01_0303morning_0015_0.jpg", 0)],
        "list_val.txt": [("train", "0001/0001_003_15_0303noon_0456_2.jpg", 1)],
        "list_query.txt": [("test", "0000/0000_000_07_0303morning_0035_1.jpg", 0)],
        "list_gallery.txt": [
            ("test", "0000/0000_001_02_0303afternoon_0015_0.jpg", 0),
            ("test", "0001/0001_004_11_0303noon_0456_2.jpg", 1),
        ],
    }
    root.mkdir()
    for list_name, entries in lists.items():
        with open(root / list_name, "w") as f:
            for folder, rel, pid in entries:
                _write_image(str(root / folder / rel))
                f.write(f"{rel} {pid}\n")
    dataset = load_dataset("msmt17_v1", str(tmp_path))
    assert [r.pid for r in dataset.train] == [0, 1]  # train + val
    # The third name field is the 1-based camera.
    assert [r.camera for r in dataset.train] == [0, 14]
    assert [r.camera for r in dataset.query] == [6]
    assert [r.camera for r in dataset.gallery] == [1, 10]
    assert load_dataset("auto", str(tmp_path)).name == "msmt17_v1"


def test_msmt17_v2_folders_and_missing_image(tmp_path):
    root = tmp_path
    files = {
        "list_train.txt": ("mask_train_v2", "0000/0000_000_01_0303morning_0015_0.jpg 0"),
        "list_query.txt": ("mask_test_v2", "0000/0000_000_07_0303morning_0035_1.jpg 0"),
        "list_gallery.txt": ("mask_test_v2", "0000/0000_001_02_0303afternoon_0015_0.jpg 0"),
    }
    for list_name, (folder, line) in files.items():
        _write_image(str(root / folder / line.split()[0]))
        (root / list_name).write_text(line + "\n")
    dataset = load_dataset("msmt17_v2", str(root))
    assert len(dataset.train) == len(dataset.query) == len(dataset.gallery) == 1
    (root / "list_gallery.txt").write_text("0000/0000_009_02_0303afternoon_0015_0.jpg 0\n")
    with pytest.raises(DataError, match=r"list_gallery.txt:1 names .* does not exist"):
        load_dataset("msmt17_v2", str(root))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: os.makedirs(os.path.join(root, "query")), "missing bounding_box_train"),
        (
            lambda root: make_market_tree(root, {**MARKET_NAMES, "query": []}),
            "split 'query' is empty",
        ),
        (
            lambda root: make_market_tree(root, {**MARKET_NAMES, "train": ["person1.jpg"]}),
            "cannot parse .*person1.jpg",
        ),
        (
            lambda root: make_market_tree(root, {**MARKET_NAMES, "train": ["0001_c0s1_01.jpg"]}),
            "camera number 0",
        ),
    ],
)
def test_bad_layouts_raise_one_line_errors(tmp_path, setup, message):
    root = str(tmp_path / "data")
    setup(root)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("market1501", root)
    assert "\n" not in str(info.value)


def test_stats_cli_json_and_errors(tmp_path):
    root = make_market_tree(str(tmp_path / "m"), MARKET_NAMES)
    out = subprocess.run(
        [sys.executable, "-m", "jaxreid.data", "stats", "--root", root, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(out.stdout)
    assert stats["query"] == {"images": 2, "ids": 2, "cameras": 2}
    bad = subprocess.run(
        [sys.executable, "-m", "jaxreid.data", "stats", "--root", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "does not exist" in bad.stderr


def test_decode_converts_modes_and_skips_corrupt(tmp_path):
    root = make_market_tree(str(tmp_path), MARKET_NAMES)
    train_dir = os.path.join(root, "bounding_box_train")
    _write_image(os.path.join(train_dir, "0002_c1s1_000451_03.jpg"), mode="L")
    _write_image(os.path.join(train_dir, "0002_c2s1_000551_01.jpg"), size=(32, 40))
    dataset = load_dataset("market1501", root)
    ok = decode_split(dataset.train, 64, 32, desc="train")
    assert ok.images.shape == (3, 64, 32, 3) and ok.images.dtype == np.uint8
    assert ok.num_converted == 1  # the grayscale JPEG
    with open(os.path.join(train_dir, "0007_c3s3_076469_02.png"), "wb") as f:
        f.write(b"not an image at all")
    with pytest.raises(DataError, match=r"1 of 3 images .*0007_c3s3_076469_02.png"):
        decode_split(dataset.train, 64, 32, desc="train")
    partial = decode_split(dataset.train, 64, 32, desc="train", max_bad_fraction=0.5)
    assert partial.images.shape[0] == 2 and partial.num_bad == 1
    assert [r.index for r in partial.records] == [0, 1]


def test_decode_rgba_png_and_cache(tmp_path):
    root = make_market_tree(str(tmp_path), MARKET_NAMES)
    png = os.path.join(root, "bounding_box_train", "0007_c3s3_076469_02.png")
    _write_image(png, mode="RGBA")
    dataset = load_dataset("market1501", root)
    first = decode_split(dataset.train, 32, 16, cache_dir=str(tmp_path / "cache"), desc="t")
    assert first.num_converted == 1
    second = decode_split(dataset.train, 32, 16, cache_dir=str(tmp_path / "cache"), desc="t")
    np.testing.assert_array_equal(first.images, second.images)
    expected = np.asarray(Image.open(png).convert("RGB").resize((16, 32), Image.BILINEAR))
    np.testing.assert_array_equal(first.images[2], expected)


def test_tfds_builder_round_trip(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from jaxreid.data import tfds_builders

    root = make_market_tree(str(tmp_path / "m"), MARKET_NAMES)
    builder = tfds_builders.ReidMarketLayout(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    source = tfds.data_source("reid_market_layout", data_dir=str(tmp_path / "tfds"))
    assert {k: len(v) for k, v in source.items()} == {"train": 3, "query": 2, "gallery": 4}
    example = source["gallery"][3]
    assert example["pid"] == 0 and example["image"].shape == (128, 64, 3)


def test_build_cli_writes_array_record_and_reports_bad_root(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    root = make_market_tree(str(tmp_path / "m"), MARKET_NAMES)
    command = [sys.executable, "-m", "jaxreid.data", "build", "--format", "market_layout"]
    subprocess.run(
        [*command, "--root", root, "--data_dir", str(tmp_path / "out")],
        check=True,
        capture_output=True,
    )
    source = tfds.data_source("reid_market_layout", data_dir=str(tmp_path / "out"))
    assert len(source["query"]) == 2
    bad = subprocess.run(
        [*command, "--root", str(tmp_path / "nope"), "--data_dir", str(tmp_path / "o2")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.skipif(not os.path.isdir(CUHK03), reason="../shared/data/cuhk03 is absent")
def test_real_cuhk03_stats():
    stats = dataset_stats(load_dataset("cuhk03", CUHK03))
    assert stats["train"] == {"images": 7357, "ids": 767, "cameras": 10}
    assert stats["query"] == {"images": 1400, "ids": 700, "cameras": 10}
    assert stats["gallery"] == {"images": 5340, "ids": 700, "cameras": 10}
    dataset = load_dataset("cuhk03", CUHK03)
    decoded = decode_split(dataset.query[:16], 128, 64, desc="q")
    assert decoded.images.shape == (16, 128, 64, 3) and decoded.images.std() > 10
