"""SCL on the real CUHK03 crops in ../shared/data/cuhk03 (Market layout),
EfficientNet-Lite0 with ImageNet weights (packaged, read without torch). At
this budget SCL barely moves CUHK03 (docs/results/cuhk03_adaptation.md):
raise train.epochs for longer runs.

    python -m jaxreid.main --config=configs/cuhk03.py --workdir=/tmp/cuhk03
"""

from recipes import CUHK03

from jaxreid.config_base import base_config


def get_config():
    c = base_config()
    c.data.dataset = "cuhk03"
    c.data.root = CUHK03
    c.data.height, c.data.width = 128, 64  # the crops are 64x128

    c.model.backbone = "efficientnet_lite0"
    c.model.pretrained = "imagenet"
    c.model.head = "scl"
    c.model.embed_dim = 512
    c.model.num_stripes = 4
    c.model.bn_group_size = 32

    c.method.warmup_epochs = 1

    c.optimizer.name = "sgd"
    c.optimizer.lr = 1e-2
    c.optimizer.weight_decay = 5e-4

    c.train.batch_size = 32
    c.train.epochs = 4
    c.train.eval_every = 2
    c.train.log_every = 20
    c.eval.batch_size = 256
    return c
