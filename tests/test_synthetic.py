"""Tests for the synthetic Market-1501-layout generator (tiny sets, a few seconds in all)."""

import json
import os
import re
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from jaxreid.data import synthetic

TINY = dict(
    num_ids=6,
    num_cameras=3,
    images_per_id_per_camera=2,
    num_distractors=3,
    num_junk=2,
)
NAME = re.compile(r"^(-1|\d{4})_c(\d+)s1_(\d{6})_(\d{2})\.jpg$")


def _files(root):
    """{(split, name): bytes} for every image under root."""
    out = {}
    for split in synthetic.SPLITS:
        for name in os.listdir(os.path.join(root, split)):
            with open(os.path.join(root, split, name), "rb") as f:
                out[(split, name)] = f.read()
    return out


def _parse(root):
    """{split: [(pid, 0-based camera, name)]}."""
    out = {}
    for split in synthetic.SPLITS:
        rows = []
        for name in sorted(os.listdir(os.path.join(root, split))):
            m = NAME.match(name)
            assert m, f"bad Market-1501 name {split}/{name}"
            rows.append((int(m.group(1)), int(m.group(2)) - 1, name))
        out[split] = rows
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn") / "tiny")
    meta = synthetic.generate(root, seed=0, **TINY)
    return root, meta


def test_layout_and_names(tiny):
    root, meta = tiny
    assert sorted(os.listdir(root)) == sorted([*synthetic.SPLITS, synthetic.METADATA_FILE])
    parsed = _parse(root)
    names = [n for rows in parsed.values() for _, _, n in rows]
    assert len(names) == len(set(names))
    for rows in parsed.values():
        for pid, cam, name in rows:
            assert 0 <= cam < TINY["num_cameras"]
            assert name.startswith("-1_" if pid == -1 else f"{pid:04d}_c{cam + 1}s1_")
    # Train: identities 1..3 only; query: real test identities only; gallery: plus 0 and -1.
    assert {p for p, _, _ in parsed["bounding_box_train"]} == {1, 2, 3}
    assert {p for p, _, _ in parsed["query"]} == {4, 5, 6}
    gallery_pids = [p for p, _, _ in parsed["bounding_box_test"]]
    assert gallery_pids.count(0) == TINY["num_distractors"]
    assert gallery_pids.count(-1) == TINY["num_junk"]
    assert {p for p in gallery_pids if p > 0} == {4, 5, 6}


def test_cameras_queries_and_counts(tiny):
    root, meta = tiny
    parsed = _parse(root)
    cams_of = defaultdict(set)
    per_id_cam = defaultdict(int)
    for rows in parsed.values():
        for pid, cam, _ in rows:
            if pid > 0:
                cams_of[pid].add(cam)
                per_id_cam[(pid, cam)] += 1
    assert set(cams_of) == set(range(1, 7))
    assert all(len(c) >= 2 for c in cams_of.values())
    assert set(per_id_cam.values()) == {TINY["images_per_id_per_camera"]}

    # Exactly one query per (test identity, camera it appears in), and every query has a
    # gallery image of its identity from another camera (a valid Market query).
    query_keys = [(p, c) for p, c, _ in parsed["query"]]
    assert sorted(query_keys) == sorted((p, c) for p in (4, 5, 6) for c in cams_of[p])
    gallery = {(p, c) for p, c, _ in parsed["bounding_box_test"]}
    for p, c in query_keys:
        assert any(gp == p and gc != c for gp, gc in gallery)

    counts = meta["counts"]
    assert counts["num_train_images"] == len(parsed["bounding_box_train"])
    assert counts["num_query_images"] == len(parsed["query"])
    assert counts["num_gallery_images"] == len(parsed["bounding_box_test"])
    assert counts["num_train_ids"] == 3 and counts["num_query_ids"] == 3
    assert counts["num_gallery_ids"] == 3 and counts["num_cameras"] == 3
    with open(os.path.join(root, synthetic.METADATA_FILE)) as f:
        assert json.load(f) == meta


def test_images_are_rgb_128x64(tiny):
    root, _ = tiny
    for split in synthetic.SPLITS:
        for name in os.listdir(os.path.join(root, split)):
            with Image.open(os.path.join(root, split, name)) as img:
                assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 128)


def test_deterministic_by_seed(tiny, tmp_path):
    root, _ = tiny
    again = synthetic.generate(str(tmp_path / "again"), seed=0, **TINY)
    assert _files(root) == _files(str(tmp_path / "again"))
    assert again["params"] == tiny[1]["params"]

    synthetic.generate(str(tmp_path / "other"), seed=1, **TINY)
    first, other = _files(root), _files(str(tmp_path / "other"))
    assert set(first) != set(other)  # another seed changes the layout (names) ...
    for key in set(first) & set(other):
        assert first[key] != other[key]  # ... and the pixels of any name both happen to share


def test_idempotent_and_mismatch(tiny, monkeypatch):
    root, meta = tiny
    stamp = os.path.getmtime(os.path.join(root, synthetic.METADATA_FILE))

    def fail(*args, **kwargs):
        raise AssertionError("an existing set was rendered or written again")

    # Nothing rendered, nothing written (not a wall-time bound: that depends on
    # the machine and its load).
    with monkeypatch.context() as m:
        m.setattr(synthetic, "render_image", fail)
        m.setattr(Image.Image, "save", fail)
        assert synthetic.generate(root, seed=0, **TINY) == meta
    assert os.path.getmtime(os.path.join(root, synthetic.METADATA_FILE)) == stamp
    with pytest.raises(FileExistsError, match="seed"):
        synthetic.generate(root, seed=3, **TINY)


def test_refuses_foreign_folder_and_fills_empty_one(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match="synthetic.json"):
        synthetic.generate(str(foreign), **TINY)

    empty = tmp_path / "empty"
    empty.mkdir()
    meta = synthetic.generate(str(empty), **TINY)
    assert meta["counts"]["num_train_ids"] == 3


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    saved = []
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        if len(saved) == 5:
            raise KeyboardInterrupt  # e.g. Ctrl-C half way
        saved.append(args[0])
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(str(tmp_path / "set"), **TINY)
    assert os.listdir(tmp_path) == []  # neither the set nor its temporary folder remains
    # Once the interruption is gone a clean run succeeds.
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert synthetic.generate(str(tmp_path / "set"), **TINY)["counts"]["num_query_ids"] == 3


def test_camera_style_dominates_raw_pixels():
    # One person seen by two cameras vs two people seen by one camera, same nuisance draws:
    # the camera (background, colour cast, blur) should change raw pixels more than identity.
    people = [synthetic.sample_identity(0, pid) for pid in (1, 2)]
    cams = [synthetic.sample_camera(0, c) for c in (0, 1)]

    def render(ident, cam):
        return synthetic.render_image(ident, cam, np.random.default_rng(7), occlusion_prob=0.0)

    def dist(a, b):
        return np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()

    same_person = dist(render(people[0], cams[0]), render(people[0], cams[1]))
    same_camera = dist(render(people[0], cams[0]), render(people[1], cams[0]))
    assert same_person > same_camera > 0


def test_identity_attributes_share_a_small_palette():
    idents = [synthetic.sample_identity(0, pid) for pid in range(1, 201)]
    assert all(i.pattern in synthetic.PATTERNS for i in idents)
    assert all(i.accessory in synthetic.ACCESSORIES for i in idents)
    # Limited palettes: every pattern/accessory occurs; identities repeat single attributes
    # while full attribute combinations stay mostly distinct.
    assert {i.pattern for i in idents} == set(synthetic.PATTERNS)
    assert {i.accessory for i in idents} == set(synthetic.ACCESSORIES)
    combos = {
        (i.pattern, i.accessory, i.long_sleeves, i.long_trousers, i.long_hair) for i in idents
    }
    assert len(combos) < len(idents)  # collisions on discrete attributes are common
    uppers = {tuple(np.round(i.upper, 3)) for i in idents}
    assert len(uppers) == len(idents)  # but per-identity colour jitter keeps shades distinct


def test_cli_and_validation(tmp_path, capsys):
    root = str(tmp_path / "cli")
    synthetic.main(["--root", root, "--num-ids", "4", "--num-cameras", "2", "--seed", "5"])
    counts = json.loads(capsys.readouterr().out)
    assert counts["num_train_ids"] == 2 and counts["num_cameras"] == 2
    with pytest.raises(ValueError, match="images_per_id_per_camera"):
        synthetic.generate(str(tmp_path / "bad"), images_per_id_per_camera=1)
    with pytest.raises(ValueError, match="num_cameras"):
        synthetic.generate(str(tmp_path / "bad"), num_cameras=1)
    assert not os.path.exists(tmp_path / "bad")


def test_default_parameters_are_generate_arguments():
    import inspect

    params = inspect.signature(synthetic.generate).parameters
    assert set(synthetic.DEFAULT_SYNTHETIC) <= set(params)
    d = synthetic.DEFAULT_SYNTHETIC
    # Expected train size of the CPU demo: each identity is in 2..C cameras (mean (2+C)/2).
    expected_train = (
        d["num_ids"]
        * d["train_fraction"]
        * (2 + d["num_cameras"])
        / 2
        * d["images_per_id_per_camera"]
    )
    assert 1500 <= expected_train <= 3000
