"""Cluster contrast on the CUHK03 crops (../shared/data/cuhk03) with ViT-Ti/16
from ImageNet (the shared timm weights, ../shared/data/weights), fully
unsupervised and scaled to a 2-core CPU: the CPU cluster recipe
(configs/recipes.py: GeM-free BN neck, batch 64 = 16 x 4, 5 epochs x 100
steps, constant lr) with the ViT's [CLS] token as the feature.

    python -m jaxreid.main --config=configs/cuhk03_vit.py --workdir=/tmp/cuhk03_vit
    python -m jaxreid.main --config=configs/cuhk03_vit.py --workdir=/tmp/vit0 --mode=eval

--mode=eval on a fresh workdir evaluates the imported model as it is (the
[CLS] token through an untrained BN neck ranks as the token itself).
"""

import os

from recipes import CUHK03, SHARED_DATA, cpu_cluster_config

VIT_TINY_IMAGENET = os.path.join(SHARED_DATA, "weights", "vit_tiny_patch16_224_in1k.npz")


def get_config(method: str = "cluster_contrast"):
    c = cpu_cluster_config("cuhk03", CUHK03, method or "cluster_contrast")
    c.data.height, c.data.width = 128, 64
    c.model.backbone = "vit_tiny"
    c.model.pretrained = VIT_TINY_IMAGENET
    # The 14 x 14 ImageNet position embeddings resized to this input's grid on import.
    c.model.image_size = (c.data.height, c.data.width)
    c.model.pooling = "cls"
    c.model.head = "bnneck"
    c.model.embed_dim = 0  # D = 192
    c.model.drop_path = 0.1
    return c
