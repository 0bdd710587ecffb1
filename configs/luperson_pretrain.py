"""LUPerson-scale self-supervised person pre-training (SSL-KD, `--mode=pretrain`,
#52) on a GPU: ViT-S/16 with the IBN conv stem at 256x128, from scratch, on
LUPerson's ~4M unlabelled crops (Fu et al., CVPR 2021) read from the
release's LMDB database as it unpacks (`lup/lmdb_300_30/{lmdb/, keys.pkl}`;
data.root may name that folder or one above it; `pip install lmdb`). No
labels, no cameras. Images are decoded per batch (16 threads), so the host
holds the key list, not the pixels. Crops already written out as image files
under one folder: --config.data.dataset=folder. The model is
configs/market_vit_cc.py's, so the workdir starts TransReID-SSL's
cluster-contrast recipe in place of its released LUPerson weights:

    python -m jaxreid.main --config=configs/luperson_pretrain.py --workdir=/ckpt/lup \\
        --config.data.root=/data/LUPerson
    python -m jaxreid.main --config=configs/market_vit_cc.py --workdir=/ckpt/market \\
        --config.data.root=/data/Market-1501-v15.09.15 --config.model.pretrained=/ckpt/lup
"""

from market_vit_cc import get_config as market_vit_cc_config

from jaxreid.pretrain import default_pretrain_config


def get_config():
    c = market_vit_cc_config()
    c.mode = "pretrain"
    c.data.dataset = "luperson"
    c.data.root = ""  # --config.data.root=the folder holding lup/ (or lup/lmdb_300_30)
    c.data.cache_dir = ""  # streamed: nothing decoded up front
    c.model.pretrained = ""  # from scratch
    c.model.drop_path = 0.1
    c.model.dtype = "bfloat16"
    c.pretrain = default_pretrain_config()
    c.pretrain.prototypes = 4096
    c.pretrain.projector_hidden = 2048
    c.pretrain.projector_bottleneck = 256
    c.pretrain.predictor_hidden = 1536
    c.pretrain.decode_threads = 16
    c.optimizer.name = "adam"
    c.optimizer.lr = 5e-4  # DINO's, per 256 images
    c.optimizer.schedule = "cosine"
    c.train.batch_size = 256
    c.train.epochs = 100
    c.train.steps_per_epoch = 0  # one pass over the crops
    c.train.log_every = 100
    c.train.checkpoint_every_steps = 2000
    return c
