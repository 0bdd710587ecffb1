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

`train` is a `TrainSet`: the training images' cameras (and identities, read
only by the supervised reference), the eval-mode extraction of the training
set with the current weights, and the model's output shapes. `outputs` are
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
from collections.abc import Callable, Hashable
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


@dataclasses.dataclass
class TrainSet:
    """The training set as the host hooks see it."""

    cameras: np.ndarray  # (N,) int
    # True identities: read by the supervised reference only (the label-blind
    # test shuffles them and checks that no unsupervised method changes).
    identities: np.ndarray
    # () -> eval-mode model outputs of every training image, current weights.
    extract: Callable[[], dict[str, np.ndarray]]
    # Per-sample shapes of the model's eval outputs ({"global": (D,), ...}).
    output_shapes: dict[str, tuple[int, ...]]

    @property
    def num_images(self) -> int:
        return len(self.cameras)


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


def keep_memory(epoch: int, train: TrainSet, memory: Any, resumed: bool) -> EpochPlan:
    """start_epoch of a method with one phase, a plain shuffle and a fixed memory."""
    return EpochPlan()


def no_update(memory: Any, outputs: Any, batch: Batch, aux: Any, phase: Hashable) -> Any:
    return memory


MethodFactory = Callable[[ml_collections.ConfigDict], Method]
METHODS: dict[str, MethodFactory] = {}


def register(*names: str) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: `config.method.name` in `names` builds its Method with the factory."""

    def add(factory: MethodFactory) -> MethodFactory:
        for name in names:
            METHODS[name] = factory
        return factory

    return add


def get_method(config: ml_collections.ConfigDict) -> Method:
    """The Method of `config.method.name`. `config.method.module` (an import
    path, e.g. "mylab.my_loss") is imported first: a method written outside
    jaxreid registers itself there and trains through a config alone."""
    _import_builtin_methods()
    module = config.method.get("module", "")
    if module:
        import importlib

        importlib.import_module(module)
    name = config.method.name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](config)


def method_names() -> list[str]:
    _import_builtin_methods()
    return sorted(METHODS)


def _import_builtin_methods() -> None:
    # Each module registers its methods when imported.
    from jaxreid.methods import cluster, instance_nce, scl, supervised  # noqa: F401
