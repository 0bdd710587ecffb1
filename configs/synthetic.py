"""CPU demo and the README's embedded default: SCL on the generated synthetic
set with EfficientNet-Lite0 (ImageNet weights, packaged) at 128x64; about 6
minutes on 2 CPU cores (README, Results).

    python -m jaxreid.main --config=configs/synthetic.py --workdir=/tmp/w
"""

from jaxreid.config_base import base_config


def get_config():
    c = base_config()
    c.data.dataset = "synthetic"
    c.data.root = "~/.cache/jaxreid/synthetic"  # generated on first use (deterministic)
    c.data.height, c.data.width = 128, 64

    c.model.backbone = "efficientnet_lite0"
    c.model.pretrained = "imagenet"
    c.model.last_stride = 1
    c.model.embed_dim = 256
    c.model.num_stripes = 4
    c.model.bn_group_size = 0

    c.method.k = 3
    c.method.n = 100
    c.method.warmup_epochs = 1
    # Camera style dominates the synthetic images (as in real ReID, but more):
    # a stronger cross-camera term than the paper's 0.05 picks positives from
    # other cameras early (docs/results/fidelity.md, the main command).
    c.method.lam_c = 0.5

    c.optimizer.name = "adam"
    c.optimizer.lr = 3.5e-4
    c.optimizer.weight_decay = 5e-4

    c.train.batch_size = 32
    c.train.epochs = 6
    c.train.eval_every = 3
    c.train.log_every = 10
    c.eval.batch_size = 256
    return c
