"""Self-supervised person pre-training (SSL-KD, `--mode=pretrain`, #52) of
ViT-Ti/16 from ImageNet (the shared timm weights, ../shared/data/weights) on
the CUHK03 + VIPeR training crops (labels not read), sized for a 2-core CPU:
the model of configs/cuhk03_vit.py (128x64, [CLS] token through the BN
neck), so its workdir starts that config's clustering methods. Masked
restoration predicts the teacher's patch tokens under the hidden patches.

    python -m jaxreid.main --config=configs/pretrain_vit.py --workdir=/tmp/pre_vit
    python -m jaxreid.main --config=configs/cuhk03_vit.py --workdir=/tmp/pre_vit_eval \\
        --mode=eval --config.model.pretrained=/tmp/pre_vit
"""

import os

from cuhk03_vit import get_config as cuhk03_vit_config
from recipes import CUHK03, VIPER

from jaxreid.pretrain import default_pretrain_config


def get_config():
    c = cuhk03_vit_config()
    c.mode = "pretrain"
    c.data.dataset = "folder"
    c.data.root = os.pathsep.join(
        os.path.join(root, "bounding_box_train") for root in (CUHK03, VIPER)
    )
    c.pretrain = default_pretrain_config()
    c.pretrain.teacher_momentum = 0.99  # a short run
    c.optimizer.name = "adam"
    c.optimizer.lr = 5e-5
    c.optimizer.schedule = "cosine"
    c.train.batch_size = 32
    c.train.epochs = 2
    c.train.steps_per_epoch = 200
    c.train.log_every = 10
    c.train.checkpoint_every_steps = 50
    return c
