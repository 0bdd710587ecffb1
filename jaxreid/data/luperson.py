"""LUPerson (Fu et al., CVPR 2021) as its authors release it: the crops in an
LMDB database beside a pickled key list,

    ROOT/lup/lmdb_300_30/lmdb/{data.mdb,lock.mdb}
    ROOT/lup/lmdb_300_30/keys.pkl      {"keys": [...], "pids": [...]}

where each key's value is the encoded image (JPEG). `data.root` may name
ROOT, ROOT/lup or the folder that holds `lmdb/` and `keys.pkl`. Only the keys
are read (the tracklet ids in "pids" are not labels and unsupervised
pre-training reads none); an image is read from the database when its batch
is decoded (`jaxreid.data.images.decode_image` takes the record's path,
"lmdb:<database>::<key>"), so 4 million crops cost their key list. Needs the
`lmdb` package (`pip install lmdb`, the `luperson` extra), imported lazily.
"""

from __future__ import annotations

import os
import pickle
import threading

from jaxreid.data.datasets import DataError, Record, ReidDataset

PREFIX = "lmdb:"
_SEPARATOR = "::"
_LAYOUT = (
    "expected lmdb/ (data.mdb) and keys.pkl, as LUPerson's release unpacks them "
    "(lup/lmdb_300_30/); give data.root that folder or one above it"
)


def _find_base(root: str) -> str:
    """The folder under `root` (itself, lup/, lup/<one sub-folder>) holding
    lmdb/ and keys.pkl."""
    if not os.path.isdir(root):
        raise DataError(f"dataset root {root!r} does not exist (luperson): {_LAYOUT}")
    candidates = [root]
    for parent in (root, os.path.join(root, "lup")):
        if os.path.isdir(parent):
            candidates += sorted(
                os.path.join(parent, name)
                for name in os.listdir(parent)
                if os.path.isdir(os.path.join(parent, name))
            )
    found = [
        c
        for c in dict.fromkeys(candidates)
        if os.path.isdir(os.path.join(c, "lmdb")) and os.path.isfile(os.path.join(c, "keys.pkl"))
    ]
    if not found:
        raise DataError(f"no LUPerson database under dataset root {root!r}: {_LAYOUT}")
    if len(found) > 1:
        raise DataError(
            f"several LUPerson databases under {root!r} ({', '.join(found)}): "
            "point data.root at the one to read"
        )
    return found[0]


class _KeysUnpickler(pickle.Unpickler):
    """keys.pkl holds lists / dicts of strings and numbers (numpy arrays at
    most): refuse any other class rather than run what a pickle names."""

    def find_class(self, module: str, name: str):
        if module == "builtins" and name in ("list", "dict", "tuple", "str", "int", "set"):
            return super().find_class(module, name)
        if module.split(".")[0] == "numpy":
            return super().find_class(module, name)
        raise DataError(f"keys.pkl names {module}.{name}: not a LUPerson key list")


def read_keys(path: str) -> list[str]:
    """The image keys of a LUPerson keys.pkl ({"keys": [...], ...} or a plain list)."""
    try:
        with open(path, "rb") as f:
            data = _KeysUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cannot read {path!r} ({e}): expected LUPerson's keys.pkl") from e
    keys = data.get("keys") if isinstance(data, dict) else data
    if keys is None or not len(keys):
        raise DataError(f"{path!r} holds no image keys (expected {{'keys': [...]}})")
    return [k.decode() if isinstance(k, bytes) else str(k) for k in keys]


def read_luperson(root: str) -> ReidDataset:
    """The training crops of LUPerson's release (no query or gallery split,
    no cameras: pre-training data)."""
    base = _find_base(root)
    database = os.path.join(base, "lmdb")
    keys = read_keys(os.path.join(base, "keys.pkl"))
    train = [
        Record(path=f"{PREFIX}{database}{_SEPARATOR}{key}", pid=-1, camera=0, index=i)
        for i, key in enumerate(keys)
    ]
    return ReidDataset(name="luperson", root=base, train=train, query=[], gallery=[])


_environments: dict[str, object] = {}
_lock = threading.Lock()


def _environment(database: str):
    with _lock:
        if database not in _environments:
            try:
                import lmdb
            except ImportError as e:
                raise DataError(
                    "reading LUPerson's database needs the lmdb package: pip install lmdb "
                    "(or pip install 'jaxreid[luperson]')"
                ) from e
            try:
                _environments[database] = lmdb.open(
                    database, readonly=True, lock=False, readahead=False, meminit=False
                )
            except lmdb.Error as e:
                raise DataError(f"cannot open the LMDB database {database!r} ({e})") from e
        return _environments[database]


def image_bytes(path: str) -> bytes:
    """The encoded image of a record path "lmdb:<database>::<key>"."""
    database, _, key = path[len(PREFIX) :].rpartition(_SEPARATOR)
    with _environment(database).begin(write=False) as txn:
        value = txn.get(key.encode())
    if value is None:
        raise FileNotFoundError(path)
    return bytes(value)
