"""Every config file loads, names a known method, and the recipe configs carry
the settings of cluster-family.md."""

from __future__ import annotations

import glob
import os

import pytest

from jaxreid.config_base import load_config as _load
from jaxreid.methods import get_method

# Every config file (recipes.py is the module they import, not a config).
CONFIGS = sorted(
    path
    for path in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if os.path.basename(path) != "recipes.py"
)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_names_a_method(path):
    config = _load(path)
    method = get_method(config)
    name = os.path.basename(path)[:-3]
    expected = {
        "cuhk03_cc": "cluster_contrast",
        "cuhk03_cc_hard": "cluster_contrast",
        "cuhk03_uda": "cluster_contrast",
        "cuhk03_vit": "cluster_contrast",
        "cuhk03_vitc": "cap",
        "cuhk03_jcl": "joint",
        "cuhk03_hhcl_mcsl": "hhcl",
        "cuhk03_to_viper": "sal",
    }
    # Winograd only where the backbone has dense 3x3 convolutions (else build_model raises).
    assert config.model.winograd == config.model.backbone.startswith("resnet")
    if name.startswith("cuhk03_"):
        assert config.method.name == expected.get(name, name[len("cuhk03_") :])
    if method.name != "scl":  # P x K batches over (pseudo-)identities
        assert config.train.batch_size % config.train.num_instances == 0
        # sdft trains the stripes of the scl / fusion heads.
        heads = ("scl", "fusion") if method.name == "sdft" else ("bnneck", "fc")
        assert config.model.head in heads


def test_cross_domain_rows_share_one_budget():
    """configs/cuhk03_to_viper.py: every row starts from the MSMT17 OSNet and
    trains the same steps; the two-domain rows read the CUHK03 source, the
    others do not."""
    from recipes import OSNET_MSMT17

    path = CONFIGS[[os.path.basename(p) for p in CONFIGS].index("cuhk03_to_viper.py")]
    budgets = set()
    for row in ("source_only", "cluster_contrast", "hhcl", "sal", "clc", "ppan"):
        config = _load(path, row)
        method = get_method(config)
        assert config.model.pretrained == OSNET_MSMT17
        budgets.add((config.train.epochs, config.train.steps_per_epoch, config.train.batch_size))
        assert bool(config.data.source_root) == method.two_domain, row
        assert config.data.root.endswith("viper") != (row == "source_only"), row
    assert len(budgets) == 1
    with pytest.raises(ValueError, match="unknown row"):
        _load(path, "nope")


def test_cluster_recipe_settings():
    market = _load(CONFIGS[[os.path.basename(p) for p in CONFIGS].index("market_cc.py")])
    assert (market.model.backbone, market.model.pooling, market.model.last_stride) == (
        "resnet50",
        "gem",
        1,
    )
    assert (market.train.batch_size, market.train.num_instances) == (256, 16)
    assert (market.train.epochs, market.train.steps_per_epoch) == (50, 200)
    assert (market.method.temperature, market.method.momentum) == (0.05, 0.1)
    assert (market.cluster.k1, market.cluster.k2, market.cluster.min_samples) == (30, 6, 4)
    assert market.optimizer.name == "adam" and market.optimizer.lr == 3.5e-4
    assert market.model.winograd  # the ResNet-50 recipes: faster CPU steps
    msmt = _load(CONFIGS[[os.path.basename(p) for p in CONFIGS].index("msmt17_cc.py")])
    assert msmt.train.steps_per_epoch == 400
    hhcl = _load(CONFIGS[[os.path.basename(p) for p in CONFIGS].index("market_cc.py")], "hhcl")
    assert (hhcl.method.name, hhcl.method.memory_update) == ("hhcl", "mean")
    assert hhcl.method.instance_momentum == 0.0
    with pytest.raises(ValueError, match="unknown method"):
        _load(CONFIGS[[os.path.basename(p) for p in CONFIGS].index("market_cc.py")], "nope")


def test_adaptation_configs():
    """configs/cuhk03_uda.py:<method>: every unsupervised method and the
    supervised bound adapt the torchreid OSNet source at 256x128 with the same
    budget; the same function builds any Market-layout target from any
    torchreid OSNet checkpoint."""
    from recipes import RECIPE_METHODS, cluster_config, uda_config

    path = CONFIGS[[os.path.basename(p) for p in CONFIGS].index("cuhk03_uda.py")]
    budgets = set()
    for name in [*RECIPE_METHODS, "scl"]:
        config = _load(path, name)
        get_method(config)
        assert config.model.backbone == "osnet_x0_25"
        assert config.model.pretrained.endswith("weights/osnet_x0_25_msmt17.pth")
        assert (config.data.height, config.data.width) == (256, 128)
        assert config.model.head == ("scl" if name == "scl" else "fc")
        # HHCL and its upper bound ranked alike, beside the plain cosine.
        assert config.eval.camera_affinity == (0.2 if name in ("hhcl", "supervised") else 0.0)
        assert config.optimizer.schedule == (
            "constant" if name in ("hhcl", "supervised") else "cosine"
        )
        assert config.model.freeze_stages == (1 if name in ("hhcl", "supervised") else 2)
        if name not in ("scl", "supervised"):
            # Only HHCL was measured with the narrower Jaccard (the others' rows use 30).
            assert config.cluster.k1 == (20 if name == "hhcl" else 30)
            # ... and the sharper temperature (the others keep their family's).
            family = cluster_config("cuhk03", "/data/cuhk03", name).method.temperature
            assert config.method.temperature == (0.04 if name == "hhcl" else family)
            # ... and the camera-aware Jaccard, at the sizes measured.
            assert config.cluster.camera_aware_jaccard == (name == "hhcl")
            if name == "hhcl":
                sizes = [
                    config.cluster[k] for k in ("k1_intra", "k1_inter", "k2_intra", "k2_inter")
                ]
                assert sizes == [10, 10, 4, 2]
        budgets.add((config.train.epochs, config.train.steps_per_epoch))
    assert len(budgets) == 1
    other = uda_config(
        "market1501", "/data/market", "hhcl", source="/w/osnet_x1_0_duke.pth", backbone="osnet_x1_0"
    )
    assert (other.data.dataset, other.data.root) == ("market1501", "/data/market")
    assert (other.model.pretrained, other.model.backbone) == (
        "/w/osnet_x1_0_duke.pth",
        "osnet_x1_0",
    )
    assert other.method.name == "hhcl"
