"""Deterministic, resumable samplers of training-batch indices.

An epoch's batches are a pure function of (seed, epoch), so a run restored at
(epoch, step) continues with exactly the batches the uninterrupted run would
have seen: `epoch_batches(epoch)[step:]`. Batches are global (all processes,
all devices); each process feeds its own slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


class ShuffleSampler:
    """Plain shuffle: every image once per pass, incomplete last batch dropped.
    An epoch has `num_steps` batches (default one pass); more than one pass
    continues with further permutations."""

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, num_steps: int = 0):
        if batch_size <= 0 or num_items < batch_size:
            raise ValueError(
                f"batch size {batch_size} needs at least that many items, got {num_items}"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_steps = num_steps or num_items // batch_size

    def __len__(self) -> int:
        return self.num_steps

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(num_steps, batch_size) int32 indices of epoch `epoch`."""
        rng = _epoch_rng(self.seed, epoch)
        per_pass = self.num_items // self.batch_size
        passes = []
        for _ in range(-(-self.num_steps // per_pass)):
            order = rng.permutation(self.num_items)[: per_pass * self.batch_size]
            passes.append(order.reshape(per_pass, self.batch_size))
        return np.concatenate(passes)[: self.num_steps].astype(np.int32)


class IdentitySampler:
    """P identities x K images per batch, by (pseudo-)label.

    Labels < 0 (outliers) are never sampled. Within an identity the K images
    are drawn round-robin over its cameras (a camera repeats only when the
    identity has fewer than K cameras); identities with fewer than K images
    repeat images. An epoch covers every identity `ceil(images/K)` times and
    has `num_steps` batches (all identities once per pass by default).
    """

    def __init__(
        self,
        labels: Sequence[int],
        cameras: Sequence[int],
        batch_size: int,
        num_instances: int,
        seed: int = 0,
        num_steps: int | None = None,
    ):
        if batch_size % num_instances:
            raise ValueError(
                f"batch size {batch_size} must be a multiple of num_instances {num_instances}"
            )
        self.labels = np.asarray(labels)
        self.cameras = np.asarray(cameras)
        self.batch_size, self.num_instances, self.seed = batch_size, num_instances, seed
        self.ids_per_batch = batch_size // num_instances
        self.identities = np.unique(self.labels[self.labels >= 0])
        if len(self.identities) < self.ids_per_batch:
            raise ValueError(
                f"{len(self.identities)} (pseudo-)identities but a batch needs "
                f"{self.ids_per_batch} ({batch_size} / {num_instances}); lower the batch size "
                "or num_instances"
            )
        self.members = {int(p): np.flatnonzero(self.labels == p) for p in self.identities}
        self.num_steps = num_steps or max(1, len(self.identities) // self.ids_per_batch)

    def __len__(self) -> int:
        return self.num_steps

    def _draw_instances(self, rng: np.random.Generator, pid: int) -> np.ndarray:
        members = rng.permutation(self.members[pid])
        by_camera: dict[int, list[int]] = {}
        for i in members:
            by_camera.setdefault(int(self.cameras[i]), []).append(int(i))
        queues = [by_camera[c] for c in rng.permutation(sorted(by_camera))]
        chosen: list[int] = []
        # Round-robin over cameras: prefers different cameras, uses every image
        # before repeating one.
        while len(chosen) < self.num_instances:
            for queue in queues:
                if queue and len(chosen) < self.num_instances:
                    chosen.append(queue.pop(0))
            if not any(queues):
                chosen += list(rng.choice(members, self.num_instances - len(chosen)))
        return np.asarray(chosen, dtype=np.int32)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(num_steps, batch_size) int32 indices of epoch `epoch`."""
        rng = _epoch_rng(self.seed, epoch)
        batches = []
        order: list[int] = []
        while len(batches) < self.num_steps:
            chosen: list[int] = []
            deferred: list[int] = []
            # Distinct identities per batch; an id met twice across the
            # boundary of two passes waits for the next batch.
            while len(chosen) < self.ids_per_batch:
                if not order:
                    order = [int(p) for p in rng.permutation(self.identities)]
                pid = order.pop(0)
                (deferred if pid in chosen else chosen).append(pid)
            order = deferred + order
            batches.append(np.concatenate([self._draw_instances(rng, p) for p in chosen]))
        return np.stack(batches).astype(np.int32)


class CameraGroupSampler:
    """P x K batches whose batch-norm groups each hold one camera's images.

    The train step normalises every group of `group_size` samples with its own
    statistics, so a group drawn from one camera is camera batch norm in training
    (Zhuang et al., ECCV 2020): what a camera's images share (light, background)
    is removed at every layer, as `cluster.camera_bn` / `eval.camera_bn` do at
    extraction. Each group: a camera drawn in proportion to its sampled images,
    then `group_size / num_instances` distinct (pseudo-)identities with members
    in it (a queue per camera, so every identity comes round), K of their images
    from that camera (repeating images when it has fewer). Labels < 0 are never
    sampled; cameras with too few identities for a group are never drawn.
    """

    def __init__(
        self,
        labels: Sequence[int],
        cameras: Sequence[int],
        batch_size: int,
        num_instances: int,
        group_size: int,
        seed: int = 0,
        num_steps: int | None = None,
    ):
        if group_size <= 0 or batch_size % group_size or group_size % num_instances:
            raise ValueError(
                f"batch size {batch_size} must be a multiple of the batch-norm group size "
                f"{group_size}, itself a multiple of num_instances {num_instances}"
            )
        labels, cameras = np.asarray(labels), np.asarray(cameras)
        self.batch_size, self.num_instances, self.seed = batch_size, num_instances, seed
        self.group_size, self.ids_per_group = group_size, group_size // num_instances
        kept = labels >= 0
        # (camera, identity) -> that identity's images in that camera.
        self.members: dict[int, dict[int, np.ndarray]] = {}
        for camera in np.unique(cameras[kept]):
            in_camera = kept & (cameras == camera)
            ids = np.unique(labels[in_camera])
            if len(ids) >= self.ids_per_group:
                self.members[int(camera)] = {
                    int(p): np.flatnonzero(in_camera & (labels == p)) for p in ids
                }
        if not self.members:
            raise ValueError(
                f"no camera has {self.ids_per_group} (pseudo-)identities for a batch-norm group "
                f"of {group_size} = {self.ids_per_group} x {num_instances}; lower "
                "model.bn_group_size or train.num_instances, or turn train.camera_groups off"
            )
        self.group_cameras = np.asarray(sorted(self.members))
        sizes = np.asarray(
            [sum(len(m) for m in self.members[c].values()) for c in self.group_cameras]
        )
        self.camera_weights = sizes / sizes.sum()
        identities = len(np.unique(labels[kept]))
        self.num_steps = num_steps or max(1, identities * num_instances // batch_size)

    def __len__(self) -> int:
        return self.num_steps

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(num_steps, batch_size) int32 indices of epoch `epoch`."""
        rng = _epoch_rng(self.seed, epoch)
        queues: dict[int, list[int]] = {int(c): [] for c in self.group_cameras}
        groups_per_batch = self.batch_size // self.group_size
        drawn = rng.choice(
            self.group_cameras, size=(self.num_steps, groups_per_batch), p=self.camera_weights
        )
        batches = []
        for row in drawn:
            groups = []
            for camera in row:
                camera, queue, chosen = int(camera), queues[int(camera)], []
                while len(chosen) < self.ids_per_group:
                    if not queue:
                        # A new pass over the camera's ids, none repeated within the group.
                        fresh = [int(p) for p in rng.permutation(sorted(self.members[camera]))]
                        queue.extend(p for p in fresh if p not in chosen)
                    chosen.append(queue.pop(0))
                for pid in chosen:
                    images = self.members[camera][pid]
                    take = rng.permutation(images)[: self.num_instances]
                    if len(take) < self.num_instances:
                        extra = rng.choice(images, self.num_instances - len(take))
                        take = np.concatenate([take, extra])
                    groups.append(take)
            batches.append(np.concatenate(groups))
        return np.stack(batches).astype(np.int32)


class TwoDomainSampler:
    """Batches of a two-domain run: the first `source_batch_size` images P x K
    over the labelled source rows, the rest from the target rows, P x K over
    the target's pseudo-labels where the method gives any (>= 0), else a plain
    shuffle of the target. Each part draws with its own seed, so an epoch is
    a pure function of (seed, epoch) as for every sampler."""

    def __init__(
        self,
        labels: Sequence[int],
        cameras: Sequence[int],
        domains: Sequence[int],
        batch_size: int,
        source_batch_size: int,
        num_instances: int,
        seed: int = 0,
        num_steps: int | None = None,
    ):
        from jaxreid.methods import SOURCE_DOMAIN

        labels, domains = np.asarray(labels), np.asarray(domains)
        source = domains == SOURCE_DOMAIN
        target_size = batch_size - source_batch_size
        if not 0 < source_batch_size < batch_size:
            raise ValueError(
                f"source batch size {source_batch_size} must be between 0 and the batch "
                f"size {batch_size}"
            )
        self.source = IdentitySampler(
            np.where(source, labels, -1),
            cameras,
            source_batch_size,
            num_instances,
            seed=2 * seed,
            num_steps=num_steps,
        )
        self.num_steps = len(self.source)
        self.target_rows = np.flatnonzero(~source)
        if np.any(labels[~source] >= 0):
            self.target = IdentitySampler(
                np.where(source, -1, labels),
                cameras,
                target_size,
                num_instances,
                seed=2 * seed + 1,
                num_steps=self.num_steps,
            )
        else:
            self.target = ShuffleSampler(
                len(self.target_rows), target_size, seed=2 * seed + 1, num_steps=self.num_steps
            )

    def __len__(self) -> int:
        return self.num_steps

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(num_steps, batch_size) int32 indices: source part, then target part."""
        target = self.target.epoch_batches(epoch)
        if isinstance(self.target, ShuffleSampler):
            target = self.target_rows[target]
        return np.concatenate([self.source.epoch_batches(epoch), target], axis=1).astype(np.int32)
