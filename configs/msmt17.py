"""SCL on MSMT17 with the paper's configuration (see configs/market.py).
v1 list-file layout; for the v2 folders: --config.data.dataset=msmt17_v2."""

from recipes import scl_paper_config


def get_config():
    return scl_paper_config("msmt17_v1", "~/datasets/MSMT17_V1")
