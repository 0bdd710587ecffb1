"""Cluster contrast on Market-1501 with ViT-S/16 + ICS, TransReID-SSL's
fully unsupervised recipe (Luo et al., 2021, "Self-Supervised Pre-Training for
Transformer-Based Person Re-Identification"; its cluster-contrast-reid
release, market_usl.sh), published at 89.6 mAP / 95.3 rank-1: ViT-S/16 with
the IBN conv stem, pre-trained without labels on LUPerson
(vit_small_ics_cfs_lup.pth), 256x128, pixels normalised with mean and std 0.5,
drop-path 0.3, the [CLS] token through a BN neck; DBSCAN (eps 0.6, 4 samples)
on the k-reciprocal Jaccard distance (k1 30, k2 6); ClusterNCE at
temperature 0.05 with hard-sample prototype updates (momentum 0.2); 50
epochs x 200 steps of 256 = 32 x 8 images; SGD (momentum 0.9) lr 3.5e-4,
weight decay 5e-4, x0.1 every 20 epochs.

    python -m jaxreid.main --config=configs/market_vit_cc.py --workdir=W \
        --config.data.root=/data/Market-1501-v15.09.15 \
        --config.model.pretrained=/weights/vit_small_ics_cfs_lup.pth

The checkpoint's 16 x 8 position embeddings fit the 256x128 grid as they are
(other sizes: resized on import). Without ICS (vit_small_cfs_lup.pth):
--config.model.conv_stem=False.
"""

from recipes import cluster_config

LUPERSON_VIT_SMALL_ICS = "~/weights/vit_small_ics_cfs_lup.pth"  # TransReID-SSL's release


def get_config():
    c = cluster_config("market1501", "~/datasets/market1501", "cluster_contrast")
    c.data.height, c.data.width = 256, 128
    c.model.backbone = "vit_small"
    c.model.pretrained = LUPERSON_VIT_SMALL_ICS
    c.model.image_size = (256, 128)
    c.model.conv_stem = True
    c.model.patch_stride = 16
    c.model.drop_path = 0.3
    c.model.pooling = "cls"
    c.model.head = "bnneck"
    c.model.embed_dim = 0  # D = 384
    c.model.winograd = False  # ResNets only
    c.method.memory_update = "hard"  # --use-hard
    c.method.momentum = 0.2
    c.optimizer.name = "sgd"
    c.optimizer.nesterov = False
    c.optimizer.momentum = 0.9
    c.optimizer.lr = 3.5e-4
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "step"
    c.optimizer.step_epochs = 20
    c.optimizer.step_factor = 0.1
    c.train.batch_size = 256
    c.train.num_instances = 8
    c.train.epochs = 50
    c.train.steps_per_epoch = 200
    return c
