"""Cross-domain rows (issue #50): the labelled CUHK03 training identities as
the source, the unlabelled VIPeR training half as the target, evaluated on
VIPeR's test half. Every row starts from torchreid's OSNet-x0.25 trained on
MSMT17 and trains 2 epochs x 100 steps of 64 images (Adam 3.5e-4, cosine,
the adaptation recipe of configs/recipes.py `uda_config`):

    source_only        supervised on the CUHK03 source (64 source images a step)
    cluster_contrast   the target-only adaptation of the source-only model
    hhcl                 (64 target images a step): give it the source-only
                         run, --config.model.pretrained=WORKDIR_OF_source_only
    sal, clc, ppan     two-domain: 32 source (P x K) + 32 target images a step

    python -m jaxreid.main --config=configs/cuhk03_to_viper.py:source_only --workdir=/tmp/x2v_src
    python -m jaxreid.main --config=configs/cuhk03_to_viper.py:hhcl --workdir=/tmp/x2v_hhcl \\
        --config.model.pretrained=/tmp/x2v_src
    python -m jaxreid.main --config=configs/cuhk03_to_viper.py:sal --workdir=/tmp/x2v_sal

Another pair of datasets: --config.data.source_root / data.source_dataset
(the labelled source, any layout jaxreid reads) and --config.data.root /
data.dataset (the unlabelled target), e.g. Market-1501 -> your own cameras
(dataset "folder", with data.eval_root for a labelled test split).
"""

from recipes import CUHK03, OSNET_MSMT17, VIPER, uda_config

from jaxreid.methods import set_method

ROWS = ("source_only", "cluster_contrast", "hhcl", "sal", "clc", "ppan")


def get_config(row: str = "sal"):
    row = row or "sal"
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}: one of {', '.join(ROWS)}")
    if row == "source_only":
        c = uda_config("cuhk03", CUHK03, "supervised", source=OSNET_MSMT17)
        c.data.eval_root, c.data.eval_dataset = VIPER, "market_layout"
    elif row in ("cluster_contrast", "hhcl"):
        c = uda_config("market_layout", VIPER, row, source=OSNET_MSMT17)
    else:
        c = uda_config("market_layout", VIPER, "cluster_contrast", source=OSNET_MSMT17)
        set_method(c, row)
        c.data.source_root, c.data.source_dataset = CUHK03, "cuhk03"
        # Half of each batch from each domain; with batch-norm groups of 32
        # each group is one domain's images.
        c.train.source_batch_size = 32
        if row == "ppan":
            # The part branches: the stripe head's global + 4 stripes.
            c.model.head, c.model.num_stripes = "scl", 4
    c.train.epochs = 2
    c.train.steps_per_epoch = 100
    c.train.log_every = 10
    return c
