"""Self-supervised person pre-training (SSL-KD, `--mode=pretrain`, #52) of
EfficientNet-Lite0 (ImageNet weights, packaged) on unlabelled crops, sized
for a 2-core CPU: 128x64, batch 32, the model of the CPU cluster recipe
(configs/recipes.py: GeM + BN neck, D = 1280), so the run starts any
clustering method of that recipe. Default data: the CUHK03 and VIPeR
training crops together (../shared/data; their labels are not read).

    python -m jaxreid.main --config=configs/pretrain_lite0.py --workdir=/tmp/pre
    python -m jaxreid.main --config=configs/cuhk03_cc.py --workdir=/tmp/pre_eval --mode=eval \\
        --config.model.pretrained=/tmp/pre          # its features, no further training
    python -m jaxreid.main --config=configs/cuhk03_cc.py --workdir=/tmp/cc \\
        --config.model.pretrained=/tmp/pre          # cluster contrast from it

Any folder of crops: --config.data.root=/my/crops (several: joined by ':').
"""

import os

from recipes import CUHK03, VIPER, cpu_cluster_config

from jaxreid.pretrain import default_pretrain_config


def get_config():
    c = cpu_cluster_config("cuhk03", CUHK03)
    c.mode = "pretrain"
    c.data.dataset = "folder"
    c.data.root = os.pathsep.join(
        os.path.join(root, "bounding_box_train") for root in (CUHK03, VIPER)
    )
    c.pretrain = default_pretrain_config()
    # A short run: the teacher follows within ~100 steps.
    c.pretrain.teacher_momentum = 0.99
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-4
    c.optimizer.schedule = "cosine"
    c.train.batch_size = 32
    c.train.epochs = 2
    c.train.steps_per_epoch = 200
    c.train.log_every = 10
    c.train.checkpoint_every_steps = 50
    return c
