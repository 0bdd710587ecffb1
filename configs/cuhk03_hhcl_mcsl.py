"""HHCL + camera-style learning (MCSL) on the CUHK03 adaptation benchmark: the
`:hhcl` recipe of configs/cuhk03_uda.py (the best measured method) with every
training image also re-styled, after OSNet's stem, to one other camera's
channel statistics (AdaIN; jaxreid/models/camera_style.py), the HHCL loss on
the copies and an invariance term pulling each copy's feature to its
original's (jaxreid/methods/camera_style.py). The same system on VIPeR:
configs/viper_uda.py:hhcl_mcsl.

    python -m jaxreid.main --config=configs/cuhk03_hhcl_mcsl.py --workdir=/tmp/uda_hhcl_mcsl
"""

from recipes import CUHK03, OSNET_MSMT17, uda_config


def get_config():
    return uda_config("cuhk03", CUHK03, "hhcl_mcsl", source=OSNET_MSMT17)
