"""Checks a run's config before any data is read or anything compiled, so a
bad setting fails in a second with every problem named, not after extraction
or clustering."""

from __future__ import annotations

import os

import ml_collections

from jaxreid.utils import UserError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")


def _positive(problems: list[str], config: ml_collections.ConfigDict, *keys: str) -> None:
    for key in keys:
        section, name = key.split(".")
        value = config[section][name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{key} = {value!r}: must be a whole number >= 1")


def _setting(config: ml_collections.ConfigDict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def choice_problems(config: ml_collections.ConfigDict, *checks: tuple) -> list[str]:
    """'setting = value: fix' lines for the settings whose value is not one of
    their choices: each check is (dotted key, allowed values)."""
    return [
        f"{key} = {_setting(config, key)!r}: unknown; one of {', '.join(allowed)}"
        for key, allowed in checks
        if _setting(config, key) not in allowed
    ]


def number_problems(config: ml_collections.ConfigDict, *checks: tuple) -> list[str]:
    """'setting = value: fix' lines for the settings that are not finite numbers
    in their range (NaN and inf never are): each check is (dotted key, low,
    high, bounds[, hint]) with `bounds` "[]", "(]", "[)" or "()" saying which
    ends are allowed (None: unbounded) and `hint` a usual value or meaning."""
    import math

    problems = []
    for key, low, high, bounds, *hint in checks:
        value = _setting(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key} = {value!r}: must be a number")
            continue
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value >= low if bounds[0] == "[" else value > low
        if ok and high is not None:
            ok = value <= high if bounds[1] == "]" else value < high
        if not ok:
            where = f"{bounds[0]}{'-inf' if low is None else low}, "
            where += f"{'inf' if high is None else high}{bounds[1]}"
            about = f" ({hint[0]})" if hint else ""
            problems.append(f"{key} = {value!r}: must be a finite number in {where}{about}")
    return problems


def config_problems(config: ml_collections.ConfigDict, mode: str = "train") -> list[str]:
    """Every problem of `config` as 'setting = value: fix' lines (empty: fine).
    The method's block is checked against the method's own declaration, and
    in training by the method's own `problems` hook."""
    from jaxreid.data.datasets import READERS
    from jaxreid.methods import get_method, settings_problems, with_method_defaults
    from jaxreid.models.model import model_problems

    problems: list[str] = settings_problems(config)
    if mode == "train" and not problems:
        # The method's own checks, on its declared settings (all present).
        filled = with_method_defaults(config)
        method = get_method(filled)
        problems += method.problems(filled)
        problems += two_domain_problems(config, method.two_domain)
    problems += choice_problems(
        config,
        ("data.dataset", [*READERS, "auto"]),
        ("data.eval_dataset", [*READERS, "auto"]),
        ("data.source_dataset", [*READERS, "auto"]),
        ("optimizer.name", OPTIMIZERS),
        ("optimizer.schedule", SCHEDULES),
    )
    problems += model_problems(config)
    if mode != "pretrain":
        for key in ("data.dataset", "data.eval_dataset", "data.source_dataset"):
            if config.data.get(key.split(".")[1]) == "luperson":
                problems.append(
                    f"{key} = 'luperson': LUPerson has no test split, cameras or identities; "
                    "pre-train on it (--mode=pretrain) and give the workdir as model.pretrained"
                )
    _positive(problems, config, "data.height", "data.width", "eval.batch_size")
    if mode == "train":
        _positive(
            problems,
            config,
            "train.epochs",
            "train.batch_size",
            "train.eval_every",
            "train.log_every",
            "train.checkpoint_every_steps",
            "train.num_instances",
        )
        if config.train.steps_per_epoch < 0:
            problems.append(
                f"train.steps_per_epoch = {config.train.steps_per_epoch}: must be >= 0 "
                "(0 = one pass over the training set)"
            )
        problems += number_problems(
            config,
            ("optimizer.lr", 0, None, "()", "e.g. 3.5e-4; <= 0 would not descend"),
            ("optimizer.momentum", 0, 1, "[)", "0 = none; 0.9 is usual"),
            ("optimizer.weight_decay", 0, None, "[)", "0 = none; 5e-4 is usual"),
        )
        decay = config.train.get("ema_decay", 0.0)
        if not 0 <= decay < 1:
            problems.append(
                f"train.ema_decay = {decay}: must be in [0, 1) (0 = no mean model; "
                "0.99 averages about the last 100 steps)"
            )
    batch, group = config.train.batch_size, config.model.bn_group_size
    if mode == "train" and isinstance(batch, int) and batch >= 1:
        if group < 0 or (group and batch % group):
            problems.append(
                f"model.bn_group_size = {group}: must divide train.batch_size = {batch} "
                "(0 = the whole batch)"
            )
    eps, min_samples = config.cluster.eps, config.cluster.min_samples
    if not 0 < eps <= 1:
        problems.append(
            f"cluster.eps = {eps}: must be in (0, 1] (a Jaccard distance; 0.5-0.6 is usual)"
        )
    if not isinstance(min_samples, int) or min_samples < 1:
        problems.append(f"cluster.min_samples = {min_samples!r}: must be a whole number >= 1")
    final_eps = config.cluster.get("final_eps", 0.0)
    if final_eps and not 0 < final_eps <= 1:
        problems.append(
            f"cluster.final_eps = {final_eps}: must be 0 (eps at every epoch) or in (0, 1]"
        )
    problems += number_problems(
        config,
        *[
            (f"{group}.camera_affinity", 0, None, "[)", "0 = off; the adaptation recipe uses 0.2")
            for group in ("cluster", "eval")
        ],
    )
    from jaxreid.pseudo_labels.neighbors import AUTO_EXACT_MAX, INDEXES

    knn = config.cluster.get("knn", "auto")
    if knn not in INDEXES:
        problems.append(
            f"cluster.knn = {knn!r}: must be one of {', '.join(INDEXES)} ('auto' = exact up to "
            f"{AUTO_EXACT_MAX:,} images, approximate above)"
        )
    for key in ("knn_nlist", "knn_nprobe", "knn_hnsw_m", "knn_ef_search"):
        value = config.cluster.get(key, 0)
        if not isinstance(value, int) or value < 0:
            problems.append(f"cluster.{key} = {value!r}: must be a whole number >= 0 (0 = derived)")
    for key in ("k1", "k2", "k1_intra", "k1_inter", "k2_intra", "k2_inter"):
        if config.cluster[key] < 1:
            problems.append(f"cluster.{key} = {config.cluster[key]}: must be >= 1")
    from jaxreid.pseudo_labels.bottom_up import merge_problems

    problems += merge_problems(config)
    pretrained = config.model.pretrained
    if pretrained and pretrained != "imagenet":
        path = os.path.expanduser(pretrained)
        if not (os.path.isfile(path) or os.path.isdir(path)):
            problems.append(
                f"model.pretrained = {pretrained!r}: no such file or folder; point it at a "
                "torch checkpoint, ViT weights or a jaxreid run's workdir, or set it to '' "
                "for random initialisation"
            )
    return problems


def two_domain_problems(config: ml_collections.ConfigDict, two_domain: bool) -> list[str]:
    """A labelled source (data.source_root) goes with a method that trains on
    one (Method.two_domain), and its share of the batch fits."""
    source = config.data.get("source_root", "")
    name = config.method.name
    if not source:
        if two_domain:
            return [
                f"data.source_root = '': method {name!r} trains on a labelled source beside "
                "the target; point data.source_root at a labelled dataset (e.g. Market-1501)"
            ]
        return []
    if not two_domain:
        return [
            f"data.source_root = {source!r}: method {name!r} trains on the target alone; "
            "choose a method that trains on a labelled source (Method.two_domain; "
            "docs/results/cross_domain.md lists them) or set data.source_root=''"
        ]
    problems = []
    batch, instances = config.train.batch_size, config.train.num_instances
    share = config.train.get("source_batch_size", 0) or batch // 2
    if not (isinstance(share, int) and 0 < share < batch and share % max(instances, 1) == 0):
        problems.append(
            f"train.source_batch_size = {share}: must be a multiple of train.num_instances = "
            f"{instances} below train.batch_size = {batch} (the source's P x K part of each "
            "batch; 0 = half the batch)"
        )
    if config.train.camera_groups:
        problems.append(
            "train.camera_groups = True: not with a labelled source (its batch is half "
            "source, half target); set train.camera_groups=False"
        )
    return problems


def validate(config: ml_collections.ConfigDict, mode: str = "train") -> None:
    """Raises one UserError listing every problem of `config`."""
    problems = config_problems(config, mode)
    if mode == "pretrain":  # its own loop and settings (jaxreid.pretrain)
        from jaxreid.pretrain import pretrain_problems

        problems += pretrain_problems(config)
    if problems:
        raise UserError(
            f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}): "
            + "; ".join(problems)
        )


def prepare_workdir(workdir: str) -> str:
    """Creates `workdir` (absolute path returned); a clear error when it is a
    file, lies under a file, or cannot be written."""
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(
            f"--workdir {workdir}: it, or a folder above it, is an existing file; "
            "pass a folder path"
        ) from None
    except OSError as e:
        raise UserError(f"--workdir {workdir}: cannot create it ({e.strerror})") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UserError(f"--workdir {workdir}: not writable; pass a folder you can write")
    return workdir
