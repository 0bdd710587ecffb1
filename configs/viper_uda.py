"""The CUHK03 adaptation recipes (configs/cuhk03_uda.py, configs/recipes.py
`uda_config`), unchanged, on VIPeR (../shared/data/viper: 316 unlabelled
training identities, one image in each of 2 cameras; 316 queries x 316
gallery): the second target, on which a choice made on CUHK03 must hold
without re-tuning. `:method` takes the same names as cuhk03_uda.py and the
systems of recipes.UDA_SYSTEMS (mgce, jcl, hhcl_mcsl, hhcl_filter,
cluster_contrast_filter).

    python -m jaxreid.main --config=configs/viper_uda.py:hhcl --workdir=/tmp/viper_hhcl
    python -m jaxreid.main --config=configs/viper_uda.py:mgce --workdir=/tmp/viper_mgce
"""

from recipes import OSNET_MSMT17, VIPER, uda_config


def get_config(method: str = "cluster_contrast"):
    return uda_config("market_layout", VIPER, method or "cluster_contrast", source=OSNET_MSMT17)
