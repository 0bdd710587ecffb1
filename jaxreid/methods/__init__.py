"""Training methods: a few pure functions each, called by a loop that knows none.

A `Method` is five hooks (docs/new_method.md writes one from scratch):

  init_memory(train)                 host, once before training: the memory
                                     pytree the step carries (never trained
                                     by gradient).
  start_epoch(epoch, train, memory, resumed)
                                     host, at every epoch start -> EpochPlan:
                                     the epoch's phase, a new memory (or
                                     None to keep it), the labels of the
                                     P x K sampler (or None: plain shuffle),
                                     statistics and per-image arrays to save.
                                     resumed: a run restarting in the middle
                                     of the epoch, with the checkpoint's
                                     memory (keep it: the interrupted run
                                     built it).
  loss(outputs, memory, batch, rng, phase) -> (loss, aux, metrics)
                                     inside the compiled step, per group.
  update(memory, outputs, batch, aux, phase) -> memory
                                     inside the compiled step, on the whole
                                     batch, after the gradients.
  configure(config, identities) -> config
                                     host, before the model is built (the
                                     supervised classifier's size).
  problems(config) -> list[str]      host, before anything is read or
                                     compiled: 'setting = value: fix' lines
                                     for the method's own settings.

A method also declares its settings and their defaults where it registers
(`register(name, settings=...)`): they fill `config.method` when the method
is chosen (`set_method`, or `--config.method.name=` on the command line), and
a key the method does not declare is refused with the method's list. Every
module of this package is imported by `method_names` / `get_method`, so a new
built-in method is one file here; one written elsewhere is named by
`config.method.module`.

`train` is a `TrainSet`: the training images' cameras (and identities, read
only by the supervised reference), the eval-mode extraction of the training
set with the current weights, and the model's output shapes.

Two domains: a method registered with `two_domain=True` (sal, clc, ppan)
trains on a labelled source (data.source_root) beside the unlabelled target.
Its training set is the target's rows followed by the source's
(`TrainSet.domains`, `Batch.domains`: TARGET_DOMAIN / SOURCE_DOMAIN); the
identities of the target rows read -1. Its `start_epoch` labels the source
rows; each batch is `train.source_batch_size` source images P x K, then
target images (P x K where the plan labels target rows, else a shuffle). `outputs` are
the model's outputs for the augmented batch (`update` receives only
`feature_keys` of them). `phase` is one of `Method.phases` (hashable; SCL's
warm-up and selection): the step compiles once for all of them, a branch per
phase chosen at run time, so every phase's `loss` and `update` must return
the same shapes. The step, not the method, orders the memory
writes after the gradients (the backward pass reads the memory) and disables
them when the loss is not finite: `update` then receives `batch.indices` of
-1, which must write nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import struct


class Batch(struct.PyTreeNode):
    """The batch as a method sees it: training-set rows and their cameras.
    In `update`, indices of -1 mean "write nothing for this sample"."""

    indices: jax.Array  # (B,) int32
    cameras: jax.Array  # (B,) int32
    # (B,) int32: TARGET_DOMAIN (the unlabelled images) or SOURCE_DOMAIN (the
    # labelled source of a two-domain run, data.source_root).
    domains: jax.Array | None = None


# Batch.domains / TrainSet.domains values. A two-domain run's training set is
# the target's images (rows 0..N_t-1, the rows of a one-domain run) followed by
# the source's; source cameras are numbered after the target's.
TARGET_DOMAIN, SOURCE_DOMAIN = 0, 1


@dataclasses.dataclass
class TrainSet:
    """The training set as the host hooks see it."""

    cameras: np.ndarray  # (N,) int
    # True identities: read by the supervised reference only (the label-blind
    # test shuffles them and checks that no unsupervised method changes). In a
    # two-domain run the source's identities, and -1 on every target row: the
    # target's are never read.
    identities: np.ndarray
    # (rows=None) -> eval-mode model outputs of the training images (all, or
    # `rows`), current weights.
    extract: Callable[..., dict[str, np.ndarray]]
    # Per-sample shapes of the model's eval outputs ({"global": (D,), ...}).
    output_shapes: dict[str, tuple[int, ...]]
    # (N,) TARGET_DOMAIN / SOURCE_DOMAIN (all TARGET_DOMAIN in a one-domain run).
    domains: np.ndarray | None = None

    def __post_init__(self):
        if self.domains is None:
            self.domains = np.full(len(self.cameras), TARGET_DOMAIN, np.int32)

    @property
    def num_images(self) -> int:
        return len(self.cameras)

    @property
    def target_rows(self) -> np.ndarray:
        return np.flatnonzero(self.domains == TARGET_DOMAIN)

    @property
    def source_rows(self) -> np.ndarray:
        return np.flatnonzero(self.domains == SOURCE_DOMAIN)

    def zero_outputs(self) -> dict[str, np.ndarray]:
        """Zero float32 outputs of every image, in the extraction's shapes: a
        memory's placeholder before the first epoch's extraction fills it."""
        return {
            name: np.zeros((self.num_images, *shape), np.float32)
            for name, shape in self.output_shapes.items()
        }


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    phase: Hashable = None
    memory: Any = None  # a new memory (host arrays), or None: keep the current one
    sampler_labels: np.ndarray | None = None  # P x K over these (< 0: never drawn)
    stats: dict[str, float] = dataclasses.field(default_factory=dict)  # logged
    summary: str = ""  # one log line ("" = none)
    # Per-image arrays saved as WORKDIR/<name>/epoch_NNN.npy (e.g. pseudo-labels).
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    init_memory: Callable[[TrainSet], Any]
    start_epoch: Callable[[int, TrainSet, Any, bool], EpochPlan]
    loss: Callable[..., tuple[jax.Array, Any, dict[str, jax.Array]]]
    update: Callable[..., Any]
    # Model outputs `update` receives (the step gathers them over the batch).
    feature_keys: tuple[str, ...] = ()
    # The values EpochPlan.phase takes (one compiled step serves them all).
    phases: tuple[Hashable, ...] = (None,)
    configure: Callable[[ml_collections.ConfigDict, np.ndarray], ml_collections.ConfigDict] = (
        lambda config, identities: config
    )
    # Checks of a training config, run before any data is read: every problem
    # as a 'setting = value: fix' line (validate.py collects them).
    problems: Callable[[ml_collections.ConfigDict], list[str]] = lambda config: []
    # Trains on a labelled source beside the target (data.source_root): True
    # for the cross-domain methods, which also need it set.
    two_domain: bool = False
    # memory -> a pytree of PartitionSpec over it (a prefix will do): a leaf
    # whose spec is P(parallel.AXIS) has its rows spread over the devices, and
    # `loss` sees this device's rows of it (`update` sees the whole leaf).
    # None: every leaf on every device.
    memory_specs: Callable[[Any], Any] | None = None


def keep_memory(epoch: int, train: TrainSet, memory: Any, resumed: bool) -> EpochPlan:
    """start_epoch of a method with one phase, a plain shuffle and a fixed memory."""
    return EpochPlan()


def no_update(memory: Any, outputs: Any, batch: Batch, aux: Any, phase: Hashable) -> Any:
    return memory


MethodFactory = Callable[[ml_collections.ConfigDict], Method]
# () -> the method's settings and their defaults (a dict or a ConfigDict).
SettingsFactory = Callable[[], Mapping[str, Any]]
METHODS: dict[str, MethodFactory] = {}
SETTINGS: dict[str, SettingsFactory] = {}
# The method of `base_config()` (the library's own method, SCL).
DEFAULT_METHOD = "scl"
# Keys of every `method` block besides the method's own settings.
BLOCK_KEYS = ("name", "module")


def register(
    *names: str, settings: SettingsFactory = dict
) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: `config.method.name` in `names` builds its Method with the
    factory; `settings()` gives the settings the method reads from
    `config.method` and their defaults."""

    def add(factory: MethodFactory) -> MethodFactory:
        for name in names:
            if name in BLOCK_KEYS:
                raise ValueError(f"{name!r} cannot name a method: it is a key of every block")
            METHODS[name] = factory
            SETTINGS[name] = settings
        return factory

    return add


def method_settings(name: str, module: str = "") -> ml_collections.ConfigDict:
    """The settings `name` declares, at their defaults (`module` imported first)."""
    _import_methods(module)
    if name not in SETTINGS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    settings = dict(SETTINGS[name]())
    clash = sorted(set(settings) & set(BLOCK_KEYS))
    if clash:
        raise ValueError(f"method {name!r} declares {clash}: names reserved for every block")
    return ml_collections.ConfigDict(settings)


def method_config(name: str, module: str = "", **settings: Any) -> ml_collections.ConfigDict:
    """The `method` block of a config choosing `name`: its name, the module
    that registers it ("" = built in) and its declared settings, `settings`
    over the defaults. A key the method does not declare raises."""
    block = ml_collections.ConfigDict({"name": name, "module": module})
    block.update(method_settings(name, module))
    unknown = sorted(set(settings) - set(block) - set(BLOCK_KEYS))
    if unknown:
        raise ValueError(unknown_settings_line(name, unknown, block))
    block.update(settings)
    return block


def set_method(
    config: ml_collections.ConfigDict, name: str, module: str = "", **settings: Any
) -> ml_collections.ConfigDict:
    """Chooses method `name` in `config` (in place; returned): `config.method`
    becomes that method's block (`method_config`), whatever method it held."""
    with config.unlocked():
        config.method = method_config(name, module, **settings)
    return config


def unknown_settings_line(name: str, unknown: list[str], block: Mapping[str, Any]) -> str:
    known = [k for k in block if k not in BLOCK_KEYS]
    keys = ", ".join(f"method.{k}" for k in unknown)
    return (
        f"{keys}: not a setting of method {name!r} (its settings: "
        f"{', '.join(known) or 'none'}); choose another method with "
        "--config.method.name= or jaxreid.methods.set_method, which fill the block"
    )


def settings_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Problems of the `method` block as 'setting = value: fix' lines: the
    module cannot be imported, the name is unknown, or a key is not one of the
    method's settings. Missing settings are not problems (their defaults)."""
    block = config.method
    module, name = block.get("module", ""), block.name
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            return [f"method.module = {module!r}: cannot be imported ({e})"]
    if name not in method_names():
        return [f"method.name = {name!r}: unknown; one of {', '.join(method_names())}"]
    declared = method_settings(name)
    unknown = sorted(set(block) - set(declared) - set(BLOCK_KEYS))
    return [unknown_settings_line(name, unknown, declared)] if unknown else []


def with_method_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose `method` block holds every setting its method
    declares (the defaults where the block leaves one out); raises ValueError
    on an unknown method or a key the method does not declare."""
    problems = settings_problems(config)
    if problems:
        raise ValueError("; ".join(problems))
    config = ml_collections.ConfigDict(config.to_dict())
    block = method_config(config.method.name, config.method.get("module", ""))
    block.update(config.method)
    config.method = block
    return config


def get_method(config: ml_collections.ConfigDict) -> Method:
    """The Method of `config.method.name`, its settings filled from its
    declaration. `config.method.module` (an import path, e.g.
    "mylab.my_loss") is imported first: a method written outside jaxreid
    registers itself there and trains through a config alone."""
    config = with_method_defaults(config)
    method = METHODS[config.method.name](config)
    style = config.model.get("camera_style")
    if style is not None and style.styles > 0:
        # Camera-style learning wraps any method's loss (jaxreid.methods.camera_style).
        from jaxreid.methods.camera_style import with_camera_style

        method = with_camera_style(method, config)
    return method


def method_names() -> list[str]:
    _import_methods()
    return sorted(METHODS)


def pk_sampler_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Checks shared by the methods that draw P x K batches over (pseudo-)
    identities: the batch splits into K images of each of P identities, and
    with camera groups each batch-norm group into K images of each of its
    identities."""
    problems = []
    batch, instances = config.train.batch_size, config.train.num_instances
    group = config.model.bn_group_size
    if not (isinstance(batch, int) and batch >= 1 and isinstance(instances, int)):
        return problems  # validate.py reports these
    if instances >= 1 and batch % instances:
        problems.append(
            f"train.batch_size = {batch}: must be a multiple of train.num_instances = "
            f"{instances} (the P x K sampler draws K images of each of P identities)"
        )
    if config.train.camera_groups and instances >= 1 and (group or batch) % instances:
        problems.append(
            f"train.camera_groups = True: model.bn_group_size = {group or batch} must "
            f"be a multiple of train.num_instances = {instances} (each group holds "
            "K images of each of its identities, from one camera)"
        )
    return problems


def _import_methods(module: str = "") -> None:
    # Each module of this package registers its methods when imported; a
    # method written elsewhere registers itself in `module`.
    for info in pkgutil.iter_modules(__path__, __name__ + "."):
        importlib.import_module(info.name)
    if module:
        importlib.import_module(module)
