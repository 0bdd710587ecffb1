"""FCU (jaxreid/methods/fcu.py) on the CUHK03 adaptation benchmark: the
cluster-contrast recipe of configs/cuhk03_uda.py (OSNet-x0.25 from MSMT17, 8
epochs x 100 steps of 16 x 4 at 256x128, camera-centred clustering features
with camera batch norm, own-camera negatives) with the classes from
bottom-up merging instead of DBSCAN, PAUL's 6 horizontal patches of the
16 x 8 map (256 dimensions each) with their patch memory, and FCU's
repelled + attracted + patch losses.

    python -m jaxreid.main --config=configs/cuhk03_fcu.py --workdir=/tmp/uda_fcu

Merging: CUHK03's 7,357 training images start as their own clusters; the
first epoch runs 10 rounds of BUC's 5% (367 merges each: 3,687 clusters),
every later epoch one (1,118 clusters at the 8th; CUHK03 trains on 767
people). Not tuned: BUC's own schedule (one 5% round after each of 19
training steps) does not fit 8 epochs.
"""

from recipes import CUHK03, OSNET_MSMT17, uda_config

from jaxreid.methods import set_method


def get_config():
    c = uda_config("cuhk03", CUHK03, "cluster_contrast", source=OSNET_MSMT17)
    set_method(c, "fcu", camera_negatives=c.method.camera_negatives)
    c.cluster.algorithm = "bottom_up"
    c.cluster.merge_percent = 0.05
    c.cluster.merge_first_rounds = 10
    c.cluster.merge_rounds = 1
    c.model.patch_grid.rows = 6
    c.model.patch_grid.dim = 256
    return c
