"""CPU demo and the README's embedded default: SCL on the generated synthetic
set with a small ResNet-18 at 128x64; a few minutes on 2 CPU cores.

    python -m jaxreid.main --config=configs/synthetic.py --workdir=/tmp/w
"""

from jaxreid.config_base import base_config


def get_config():
    c = base_config()
    c.data.dataset = "synthetic"
    c.data.root = "~/.cache/jaxreid/synthetic"  # generated on first use (deterministic)
    c.data.height, c.data.width = 128, 64

    c.model.backbone = "resnet18"
    c.model.last_stride = 1
    c.model.embed_dim = 256
    c.model.num_stripes = 4
    c.model.bn_group_size = 0

    c.method.k = 3
    c.method.n = 100
    c.method.warmup_epochs = 1

    c.optimizer.name = "adam"
    c.optimizer.lr = 3.5e-4
    c.optimizer.weight_decay = 5e-4

    c.train.batch_size = 32
    c.train.epochs = 4
    c.train.eval_every = 2
    c.train.log_every = 10
    c.eval.batch_size = 256
    return c
