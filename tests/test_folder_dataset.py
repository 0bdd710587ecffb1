"""Dataset "folder": unlabelled crops at any depth, cameras from the first
sub-folder, a regex or none; training with evaluation on a separate labelled
root, or without evaluation."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from helpers import link_tree, step_losses, tiny_config

from jaxreid.data.datasets import DataError, load_dataset


def _crops(tiny_root, tmp_path):
    """The tiny set's training images, re-filed as cam<C>/<day>/<name>."""
    source = os.path.join(tiny_root, "bounding_box_train")
    root = tmp_path / "crops"
    for name in sorted(os.listdir(source)):
        camera = name.split("_c")[1].split("s")[0].split("_")[0]
        folder = root / f"cam{camera}" / "day1"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(source, name), folder / name)
    return str(root)


def test_cameras_from_subfolder_regex_or_none(tiny_root, tmp_path):
    root = _crops(tiny_root, tmp_path)
    market = load_dataset("market_layout", tiny_root)
    by_folder = load_dataset("folder", root)
    assert len(by_folder.train) == len(market.train) and not by_folder.query
    assert all(r.pid == -1 for r in by_folder.train)
    # cam1/ cam2/ cam3/ -> cameras 0, 1, 2, as the Market names say.
    truth = {os.path.basename(r.path): r.camera for r in market.train}
    assert all(truth[os.path.basename(r.path)] == r.camera for r in by_folder.train)
    by_regex = load_dataset("folder", root, folder_cameras=r"_c(\d+)")
    assert [r.camera for r in by_regex.train] == [r.camera for r in by_folder.train]
    assert {r.camera for r in load_dataset("folder", root, folder_cameras="none").train} == {0}
    with pytest.raises(DataError, match="finds no camera"):
        load_dataset("folder", root, folder_cameras=r"_x(\d+)")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images under"):
        load_dataset("folder", str(empty))


@pytest.mark.parametrize("evaluate", [True, False])
def test_training_on_a_folder(tiny_root, tmp_path, evaluate):
    from jaxreid.data.loading import load_data
    from jaxreid.train import train_and_evaluate

    config = tiny_config(
        _crops(tiny_root, tmp_path),
        **{"data.dataset": "folder", "train.epochs": 1, "train.steps_per_epoch": 2},
    )
    if evaluate:
        config.data.eval_root, config.data.eval_dataset = tiny_root, "market_layout"
    lines = []
    data = load_data(config, lines.append)
    workdir = str(tmp_path / "w")
    result = train_and_evaluate(config, workdir, data, log=lines.append)
    assert len(step_losses(workdir)) == 2 and np.all(np.isfinite(step_losses(workdir)))
    if evaluate:
        assert 0 <= result["final"]["plain"]["mAP"] <= 1
        assert any("query and gallery from market_layout" in ln for ln in lines)
    else:
        assert result["final"] is None and result["initial"] is None
        assert any("training without evaluation" in ln for ln in lines)


def test_linked_folders_are_followed_once(tiny_root, tmp_path):
    root, names = link_tree(tiny_root, tmp_path)
    notes = []
    dataset = load_dataset("folder", root, log=notes.append)
    found = sorted(os.path.relpath(r.path, root) for r in dataset.train)
    # Every image once, under the link that reached it first (sorted walk:
    # "again" before "camA", so camA is the repeat); the cycle is cut where it
    # comes back (again/back -> disk1, whose cam1 is listed already); both are
    # named, as is the broken link.
    assert sorted(os.path.basename(p) for p in found) == sorted(names)
    assert {p.split(os.sep)[0] for p in found} == {"again", "camB"}
    assert {r.camera for r in dataset.train} == {0, 1}
    assert len(notes) == 2, notes
    assert "skipped 2 link(s) to a folder already listed" in notes[0]
    assert "'camA', 'again/back/cam1'" in notes[0]
    assert "skipped 1 broken link(s): 'camB/gone.jpg'" in notes[1]


def test_optional_camera_group_is_refused(tiny_root, tmp_path):
    root = _crops(tiny_root, tmp_path)
    with pytest.raises(DataError, match="first group must match"):
        load_dataset("folder", root, folder_cameras=r"(_x\d+)?_c")
