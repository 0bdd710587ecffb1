"""JCL on the CUHK03 adaptation benchmark: the `:joint` recipe of
configs/cuhk03_uda.py (OSNet-x0.25 from MSMT17, 8 epochs x 100 steps of
16 x 4 at 256x128; centroid + instance memories trained jointly) with the
clusters seen by a single camera made outliers (`cluster.min_cameras`) and a
WaveBlock on the backbone's map in training (`model.waveblock`).

    python -m jaxreid.main --config=configs/cuhk03_jcl.py --workdir=/tmp/uda_jcl
"""

from recipes import CUHK03, OSNET_MSMT17, uda_config


def get_config():
    c = uda_config("cuhk03", CUHK03, "joint", source=OSNET_MSMT17)
    c.cluster.min_cameras = 2
    c.model.waveblock.rate = 1.5
    c.model.waveblock.height_ratio = 0.3
    return c
