"""Test settings: slow end-to-end tests run only with JAXREID_SLOW=1 (each has
a fast variant that always runs); one CPU device unless a test asks for more
in a subprocess."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

from jaxreid.host import configure_host

# Persistent XLA compilation cache shared by the tests, the pytest-xdist
# workers and the subprocesses they start: the training tests compile the same
# step several times (straight run, interrupted runs, resumed run, 1 and 4
# devices). jax writes an entry in place; a worker that reads one half-written
# gets an error that jax turns into a warning and a fresh compilation.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxreid-test-xla-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The process-wide XLA and malloc settings of the entry points (python -m
# jaxreid.main etc.), before any test starts jax's backend.
configure_host()


# The recipes of configs/recipes.py, imported as the config files import them.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

CUHK03 = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cuhk03")
)


# The tiny synthetic set of the training-loop tests (Market layout).
TINY_SET = dict(
    num_ids=24, num_cameras=3, images_per_id_per_camera=2, seed=3, num_distractors=4, num_junk=2
)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    from jaxreid.data import synthetic

    root = str(tmp_path_factory.mktemp("tiny") / "synthetic")
    synthetic.generate(root, **TINY_SET)
    return root


@pytest.fixture(scope="session")
def run_dir(tiny_root, tmp_path_factory):
    """A tiny SCL run (1 epoch x 2 steps) through the entry point: the trained
    workdir of the inference tools' tests (test_inference, test_entry_points_bad_input)."""
    import subprocess

    from helpers import tiny_main_command

    workdir = str(tmp_path_factory.mktemp("run") / "w")
    command = [
        *tiny_main_command(tiny_root, workdir),
        "--config.train.epochs=1",
        "--config.train.steps_per_epoch=2",
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=900)
    return workdir


# Modules with the longest tests (minutes each, mostly compiling), started
# first so that pytest-xdist's workers do not end on them one at a time.
LONG_MODULES = (
    "test_train.py",
    "test_multiprocess.py",
    "test_cluster_training.py",
    "test_release.py",
    "test_label_blind.py",
    "test_inference.py",
    "test_entry_points_bad_input.py",
    "test_new_method.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = os.path.basename(str(item.fspath))
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: the order inside a module is kept
    if os.environ.get("JAXREID_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: set JAXREID_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
