"""PISL (jaxreid/methods/pisl.py) on the generated synthetic set: a smoke run
(2 min 41 s on the shared 2-core Xeon, compilation included; 20 steps do not
raise the mAP, docs/results/patches.md): configs/synthetic.py's
EfficientNet-Lite0 (ImageNet weights) at 128x64 with a BN neck, 3 patches of
its 8 x 4 map, a 100-step diffusion sampled in 4 DDIM steps, 2 epochs x 10
steps of 16 = 4 x 4 images.

    python -m jaxreid.main --config=configs/synthetic_pisl.py --workdir=/tmp/pisl
"""

from synthetic import get_config as synthetic_config

from jaxreid.methods import set_method


def get_config():
    c = synthetic_config()
    c.model.head = "bnneck"
    c.model.pooling = "gem"
    c.model.embed_dim = 0
    c.model.bn_group_size = 0
    c.model.patches.num = 3
    c.model.patches.diffusion_steps = 100
    c.model.patches.sampling_steps = 4
    c.model.patches.hidden = 64
    set_method(c, "pisl", agreement_k=5, smooth_start_epoch=1)
    # Small set: k-reciprocal lists and DBSCAN's minimum scaled down.
    c.cluster.k1, c.cluster.k2, c.cluster.min_samples = 10, 4, 2
    c.train.batch_size = 16
    c.train.num_instances = 4
    c.train.epochs = 2
    c.train.steps_per_epoch = 10
    c.train.eval_every = 2
    c.train.log_every = 5
    c.train.checkpoint_every_steps = 100
    c.eval.batch_size = 64
    return c
