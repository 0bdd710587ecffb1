"""PISL (jaxreid/methods/pisl.py) on the CUHK03 adaptation benchmark: the
cluster-contrast recipe of configs/cuhk03_uda.py (OSNet-x0.25 from MSMT17, 8
epochs x 100 steps of 16 x 4 at 256x128, camera-centred clustering, camera
batch norm for the clustering features, own-camera negatives) with PISL's
patch branch (3 patches of the 16 x 8 map, a 1000-step cosine diffusion over
their thetas) and its losses on top of ClusterNCE.

    python -m jaxreid.main --config=configs/cuhk03_pisl.py --workdir=/tmp/uda_pisl

The patches used for the agreement, the relabelling and the patch memories
come from 5 DDIM steps (the cheap chain); the paper's full chain:
--config.model.patches.sampling_steps=1000.
"""

from recipes import CUHK03, OSNET_MSMT17, uda_config

from jaxreid.methods import set_method


def get_config():
    c = uda_config("cuhk03", CUHK03, "cluster_contrast", source=OSNET_MSMT17)
    set_method(c, "pisl", camera_negatives=c.method.camera_negatives)
    c.model.patches.num = 3
    c.model.patches.diffusion_steps = 1000
    c.model.patches.sampling_steps = 5
    return c
