"""Cluster contrast on the real CUHK03 crops (../shared/data/cuhk03), scaled
to a 2-core CPU (configs/recipes.py): EfficientNet-Lite0
with ImageNet weights at 128x64, 5 epochs x 100 steps of 16 x 4 images.

    python -m jaxreid.main --config=configs/cuhk03_cc.py --workdir=/tmp/cuhk03_cc

The other methods of the family have their own files (cuhk03_cc_hard.py,
cuhk03_self_paced.py, cuhk03_cap.py, cuhk03_hhcl.py, cuhk03_joint.py), or
pass the name: --config=configs/cuhk03_cc.py:hhcl
"""

from recipes import CUHK03, cpu_cluster_config


def get_config(method: str = "cluster_contrast"):
    return cpu_cluster_config("cuhk03", CUHK03, method or "cluster_contrast")
