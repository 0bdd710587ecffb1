"""SCL on DukeMTMC-reID with the paper's configuration (see configs/market.py)."""

from recipes import scl_paper_config


def get_config():
    return scl_paper_config("dukemtmc", "~/datasets/dukemtmc-reid")
