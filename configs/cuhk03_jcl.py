"""JCL on the CUHK03 adaptation benchmark: the `:joint` recipe of
configs/cuhk03_uda.py (OSNet-x0.25 from MSMT17, 8 epochs x 100 steps of
16 x 4 at 256x128; centroid + instance memories trained jointly) with the
clusters seen by a single camera made outliers (`cluster.min_cameras`) and a
WaveBlock on the backbone's map in training (`model.waveblock`). The same
system on VIPeR: configs/viper_uda.py:jcl.

    python -m jaxreid.main --config=configs/cuhk03_jcl.py --workdir=/tmp/uda_jcl
"""

from recipes import CUHK03, OSNET_MSMT17, uda_config


def get_config():
    return uda_config("cuhk03", CUHK03, "jcl", source=OSNET_MSMT17)
