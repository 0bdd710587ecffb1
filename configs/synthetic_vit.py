"""CPU smoke run of the ViT path: cluster contrast on the generated synthetic
set with a 4-block ViT-Ti trained from random initialisation (no weights
needed) at 128x64, flips only: the [CLS] token through a BN neck, drop-path 0.1,
camera-aware clustering at eps 0.5 (features centred per camera, negatives
from the own camera: the synthetic cameras dominate the pixels), 4 epochs x
50 steps of 16 x 4 images. Its mAP rises above the untrained model's
(tests/test_vit.py trains a smaller version).

    python -m jaxreid.main --config=configs/synthetic_vit.py --workdir=/tmp/synthetic_vit
"""

from recipes import cpu_cluster_config


def get_config():
    c = cpu_cluster_config("synthetic", "~/.cache/jaxreid/synthetic")  # generated on first use
    # Flips only: padding and random erasing slow a short run from random weights.
    c.augment.pad, c.augment.erasing_prob = 0, 0.0
    c.model.backbone = "vit_tiny"
    c.model.pretrained = ""
    c.model.vit_depth = 4
    c.model.image_size = (c.data.height, c.data.width)
    c.model.pooling = "cls"
    c.model.head = "bnneck"
    c.model.embed_dim = 0  # D = 192
    c.model.drop_path = 0.1
    # Random weights map every image close to every other: at the recipe's 0.6
    # one cluster holds most of the set.
    c.cluster.eps = 0.5
    c.cluster.camera_centering = True
    c.method.camera_negatives = True
    c.train.epochs = 4
    c.train.steps_per_epoch = 50
    c.train.eval_every = 2
    c.train.log_every = 10
    c.train.checkpoint_every_steps = 50
    return c
