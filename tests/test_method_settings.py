"""Method-owned settings: each method declares its settings and defaults, the
`method` block is filled from that declaration when the method is chosen (in
Python or on the command line), a key the method does not declare is refused
with the method's list, and the shared modules name no method."""

from __future__ import annotations

import os
import re

import pytest
from recipes import uda_config

from jaxreid.command_line import apply_method_overrides
from jaxreid.config_base import base_config
from jaxreid.methods import (
    BLOCK_KEYS,
    METHODS,
    get_method,
    method_config,
    method_names,
    method_settings,
    set_method,
)
from jaxreid.utils import UserError
from jaxreid.validate import config_problems

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("name", method_names())
def test_every_method_builds_from_its_declared_settings_alone(name):
    config = set_method(base_config(), name)
    assert set(config.method) == set(method_settings(name)) | set(BLOCK_KEYS)
    assert get_method(config).name == name


def test_method_config_puts_settings_over_the_declared_defaults():
    block = method_config("hhcl", instance_weight=0.5)
    assert (block.name, block.module) == ("hhcl", "")
    assert block.instance_weight == 0.5
    assert block.instance_momentum == method_settings("hhcl").instance_momentum == 0.0
    assert block.temperature == 0.05
    with pytest.raises(ValueError, match=r"method\.lam_t: not a setting of method 'hhcl'"):
        method_config("hhcl", lam_t=0.5)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        method_config("nope")


def test_validate_refuses_another_methods_keys_with_the_methods_list():
    config = base_config()  # SCL's block
    config.method.name = "joint"  # by hand: SCL's settings stay in the block
    (problem,) = config_problems(config)
    assert "method.alpha, method.approx_topk" in problem
    assert "not a setting of method 'joint'" in problem
    assert "its settings: camera_negatives, extract_fraction, instance_momentum" in problem
    assert config_problems(set_method(config, "joint")) == []


def test_missing_settings_take_their_defaults():
    config = base_config()
    del config.method["alpha"]
    method = get_method(config)  # builds: alpha comes from SCL's declaration
    assert method.name == "scl" and config_problems(config) == []


def _locked(config):
    config.lock()
    return config


def test_a_new_name_on_the_command_line_fills_that_methods_block():
    config = _locked(base_config())
    # The name comes first whatever the order: the setting is the new method's.
    apply_method_overrides(config, [("instance_weight", "0.25"), ("name", "joint")])
    assert config.method.to_dict() == method_config("joint", instance_weight=0.25).to_dict()


def test_the_same_name_on_the_command_line_keeps_the_recipe():
    config = _locked(uda_config("cuhk03", "/data/cuhk03", "hhcl"))
    apply_method_overrides(config, [("name", "hhcl"), ("camera_negatives", "false")])
    assert config.method.temperature == 0.04  # the recipe's, not hhcl's default 0.05
    assert config.method.camera_negatives is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([("name", "hhcl"), ("lam_t", "0.3")], "method.lam_t: not a setting of method 'hhcl'"),
        ([("k", "three")], "--config.method.k=three: must be a int"),
        ([("approx_topk", "maybe")], "--config.method.approx_topk=maybe: must be true or false"),
    ],
)
def test_command_line_method_mistakes_are_one_line(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        apply_method_overrides(_locked(base_config()), overrides)


def test_command_line_values_take_the_defaults_types():
    config = _locked(base_config())
    apply_method_overrides(
        config, [("k", "3"), ("lam_c", "1"), ("approx_topk", None), ("gradient", "release")]
    )
    assert (config.method.k, config.method.lam_c) == (3, 1.0)
    assert isinstance(config.method.lam_c, float)
    assert config.method.approx_topk is True and config.method.gradient == "release"


# The modules every method shares: they must name none (a method lives in
# its own files: jaxreid/methods/, a config, its tests).
SHARED = ["jaxreid/validate.py", "jaxreid/config_base.py", "jaxreid/train.py", "jaxreid/step.py"]


@pytest.mark.parametrize("path", SHARED)
def test_shared_modules_name_no_method(path):
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    names = sorted(METHODS)
    found = [n for n in names if re.search(rf"\b{re.escape(n)}\b", text, re.IGNORECASE)]
    assert found == [], f"{path} names {found}"
