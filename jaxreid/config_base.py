"""Defaults shared by every config file in configs/ (each file's get_config()
starts from `base_config()`, or from a recipe of configs/recipes.py, and
overrides what its experiment changes). Method settings are declared by each
method (jaxreid.methods.register)."""

from __future__ import annotations

import os

import ml_collections

from jaxreid import augment
from jaxreid.methods import DEFAULT_METHOD, method_config
from jaxreid.models.model import default_model_config
from jaxreid.pseudo_labels.clustering import default_cluster_config


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
    # Dataset "folder" (unlabelled crops at any depth): "subfolder" (the first
    # sub-folder names the camera) | "none" (one camera) | a regex whose first
    # group names it.
    c.data.folder_cameras = "subfolder"
    # Query and gallery from this labelled dataset instead ("" = the dataset's own).
    c.data.eval_root = ""
    c.data.eval_dataset = "auto"
    # Two-domain training (a method with Method.two_domain): the labelled
    # training split of this dataset beside the unlabelled target of
    # data.root ("" = one domain).
    c.data.source_root = ""
    c.data.source_dataset = "auto"

    # Sections owned by one module take that module's defaults.
    c.augment = augment.default_augment_config()
    c.model = default_model_config()

    # The chosen method's block: its name, the module registering it ("" =
    # built in) and the settings it declares (jaxreid.methods.set_method, or
    # --config.method.name= on the command line, chooses another).
    c.method = method_config(DEFAULT_METHOD)

    # Re-clustering between epochs (jaxreid.pseudo_labels.clustering.cluster_features).
    # cluster.knn = "auto": exact kNN up to 100,000 images, IVF above (#49).
    c.cluster = default_cluster_config()

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
    c.train.num_instances = 4  # K of the P x K sampler (clustering family)
    # Two-domain training: the first source_batch_size images of every batch
    # are labelled source images (P x K), the rest target images (0 = half).
    c.train.source_batch_size = 0
    # P x K batches whose batch-norm groups (model.bn_group_size) each hold one
    # camera's images: camera batch norm in training (CameraGroupSampler).
    c.train.camera_groups = False
    # Checkpoint and exit after this many steps of this invocation (0 = never):
    # for time-limited or preemptible jobs; the same command resumes.
    c.train.stop_after_steps = 0
    # 0 = resume from the latest checkpoint. A step N: only when the latest
    # checkpoint cannot be restored (damaged), resume from the earlier step N
    # (of checkpoints/latest or best) instead; the unreadable later steps move
    # to checkpoints/unreadable/. Never a silent fallback.
    c.train.resume_from = 0
    # Devices the train step runs on: 0 = all, n = the first n (single process;
    # for scaling studies). The batch's batch-norm groups (train.batch_size /
    # model.bn_group_size) must split evenly over them; the result is the same
    # bits whatever the count. Extraction always uses every local device.
    c.train.num_devices = 0
    # Mean model (Tarvainen & Valpola 2017; MMT's mean net): an exponential
    # moving average of params and batch-norm statistics, updated after every
    # step, that the methods extract from (clustering) and that is evaluated,
    # checkpointed for inference and exported. 0 = off (the trained model).
    c.train.ema_decay = 0.0

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 128  # images per device per extraction step
    c.eval.flip = False
    c.eval.rerank = False
    # Also rank with each camera's mean feature (over its query and gallery
    # images) removed: row "centred" beside "plain" (no labels read).
    c.eval.camera_centering = False
    # Extract each camera's query and gallery images with batch-norm statistics
    # of that camera's images (jaxreid.evaluate.camera_bn; no labels read).
    c.eval.camera_bn = False
    # Also rank with the camera affinity of the query and gallery features
    # (jaxreid.pseudo_labels.camera_affinity, no labels read): distance +
    # strength * (1 - A[c_q, c_g]), row "affinity" beside "plain" (with
    # eval.rerank: the re-ranking of that penalised similarity); 0 = off.
    c.eval.camera_affinity = 0.0
    c.eval.checkpoint = ""  # --mode=eval: "" = latest in workdir, else a path; none = initial
    c.eval.plots = False  # ranked-list grid + CMC curve PNGs in the workdir
    c.eval.num_plot_queries = 8
    return c


def load_config(path: str, *args: str) -> ml_collections.ConfigDict:
    """`get_config(*args)` of the config file at `path`, as `--config=path:arg`
    loads it: the file's folder on sys.path first, so that it imports its
    siblings (configs/recipes.py) as a script would."""
    import importlib.util
    import sys

    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise FileNotFoundError(f"{path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)
