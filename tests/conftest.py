"""Test settings: slow end-to-end tests run only with JAXREID_SLOW=1 (each has
a fast variant that always runs); one CPU device unless a test asks for more
in a subprocess."""

from __future__ import annotations

import os

import pytest

CUHK03 = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cuhk03")
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("JAXREID_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: set JAXREID_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
