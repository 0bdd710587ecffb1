"""Defaults shared by every config file in configs/ (each file's get_config()
starts from `base_config()` and overrides what its experiment changes)."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mode = "train"  # train | eval (also --mode on the command line)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "market1501"  # a key of jaxreid.data.datasets.READERS
    c.data.root = ""
    c.data.height = 256
    c.data.width = 128
    c.data.cache_dir = "~/.cache/jaxreid/decoded"  # decoded uint8 arrays; "" = no cache
    c.data.max_bad_fraction = 0.01  # corrupt images skipped (counted) up to this fraction
    c.data.on_device = True  # keep the decoded train set on the accelerator(s)

    c.augment = ml_collections.ConfigDict()
    c.augment.flip = True
    c.augment.pad = 0
    c.augment.erasing_prob = 0.0

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet50"
    c.model.pretrained = ""  # "" | "imagenet" (EfficientNet-Lite0) | path to a .pth
    c.model.last_stride = 1
    c.model.ibn = False
    c.model.pooling = "avg"
    c.model.head = "scl"
    c.model.embed_dim = 2048
    c.model.num_stripes = 8
    c.model.dtype = "float32"
    c.model.bn_group_size = 0  # 0 = statistics over the whole (global) batch

    c.method = ml_collections.ConfigDict()
    c.method.name = "scl"
    # SCL (scl-method.md), released configuration.
    c.method.k = 7
    c.method.n = 500
    c.method.lam_t = 0.5
    c.method.lam_p = 0.5
    c.method.lam_g = 0.5
    c.method.lam_c = 0.05
    c.method.alpha = 1.75
    c.method.temperature = 0.1  # logits are <x, M_j> / temperature (the spec's t = 10)
    c.method.warmup_epochs = 3
    c.method.selection_block = 65536  # bank rows per block of the selection scan
    c.method.approx_topk = False
    c.method.mixture_update = "sequential"  # sequential | vectorized

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd | adam
    c.optimizer.lr = 1e-3
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "constant"  # constant | step | cosine
    c.optimizer.step_epochs = 20
    c.optimizer.step_factor = 0.1

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8
    c.train.epochs = 50
    c.train.steps_per_epoch = 0  # 0 = one pass over the training set
    c.train.eval_every = 5
    c.train.log_every = 50
    c.train.checkpoint_every_steps = 500
    c.train.keep_checkpoints = 1
    # Checkpoint and exit after this many steps of this invocation (0 = never):
    # for time-limited or preemptible jobs; the same command resumes.
    c.train.stop_after_steps = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 128
    c.eval.flip = False
    c.eval.rerank = False
    c.eval.checkpoint = ""  # --mode=eval: "" = latest in workdir, else a path; none = initial
    c.eval.plots = False  # ranked-list grid + CMC curve PNGs in the workdir
    c.eval.num_plot_queries = 8
    return c


def scl_paper_config(dataset: str, root: str) -> ml_collections.ConfigDict:
    """SCL's released configuration (scl-method.md) on `dataset`: ResNet-50
    (last stride 1, ImageNet init), 256x128, flip only, batch 8, SGD Nesterov
    lr 1e-3 wd 5e-4, k = 7, n = 500, lam_t = lam_p = lam_g = 0.5, lam_c = 0.05,
    alpha = 1.75, t = 10, 3 warm-up epochs, 50 epochs, eval every 5."""
    c = base_config()
    c.data.dataset = dataset
    c.data.root = root
    c.data.height, c.data.width = 256, 128
    c.augment.flip, c.augment.pad, c.augment.erasing_prob = True, 0, 0.0

    c.model.backbone = "resnet50"
    c.model.pretrained = "~/weights/resnet50-0676ba61.pth"  # torchvision ImageNet weights
    c.model.last_stride = 1
    c.model.head = "scl"
    c.model.embed_dim = 2048
    c.model.num_stripes = 8
    # The released code ran one GPU with batch 8: statistics over all 8 images.
    c.model.bn_group_size = 8

    c.method.name = "scl"
    c.method.k, c.method.n = 7, 500
    c.method.lam_t, c.method.lam_p, c.method.lam_g = 0.5, 0.5, 0.5
    c.method.lam_c, c.method.alpha = 0.05, 1.75
    c.method.temperature = 0.1  # t = 10
    c.method.warmup_epochs = 3

    c.optimizer.name = "sgd"
    c.optimizer.lr = 1e-3
    c.optimizer.momentum, c.optimizer.nesterov = 0.9, True
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "constant"

    c.train.batch_size = 8
    c.train.epochs = 50
    c.train.eval_every = 5
    c.train.log_every = 100
    c.train.checkpoint_every_steps = 1000
    return c
