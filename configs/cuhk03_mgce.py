"""MGCE-HCL (jaxreid.methods.mgce) on the CUHK03 adaptation benchmark: the
`:hhcl` recipe of configs/cuhk03_uda.py (OSNet-x0.25 from MSMT17, 8 epochs x
100 steps of 16 x 4 at 256x128, camera-aware Jaccard, camera batch norm,
own-camera negatives, temperature 0.04) with the priority-weighted hybrid
loss of a clustering ensemble: DBSCAN at cluster.eps (0.5, the clustering that
trains) and at 0.45 and 0.4 on the same Jaccard distance. The same system on
VIPeR: configs/viper_uda.py:mgce.

    python -m jaxreid.main --config=configs/cuhk03_mgce.py --workdir=/tmp/uda_mgce
"""

from recipes import CUHK03, OSNET_MSMT17, uda_config


def get_config():
    return uda_config("cuhk03", CUHK03, "mgce", source=OSNET_MSMT17)
