"""Dataset readers: Market-1501, DukeMTMC-reID, MSMT17 (v1 and v2), any folder
in Market-1501 layout, the synthetic sets, and LUPerson's database
(jaxreid.data.luperson, pre-training only).

A reader turns a root folder into three lists of `Record`s (train, query,
gallery). It only parses names and list files; images are decoded later, once,
by `jaxreid.data.images`. Every problem a user can cause (wrong root, empty
split, unparsable name, list file naming a missing image) raises `DataError`
with one line that names the file and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence

from jaxreid.utils import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Market-1501 / DukeMTMC-reID / CUHK03-as-Market names: "0002_c1s1_000451_03.jpg",
# "-1_c3s2_..." (junk), "0000_..." (distractor), "0001_c2_f0046182.jpg",
# "0003_c10_01.jpg" (camera numbers may have several digits).
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
# MSMT17 list entries: "0000/0000_000_01_0303morning_0015_0.jpg <pid>"; the
# third field of the file name is the 1-based camera.
_MSMT_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_")


class DataError(UserError):
    """A user-fixable problem with a dataset: the message is one line naming
    the file or folder and the fix."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One image. `pid` is used by evaluation only; `camera` is 0-based."""

    path: str
    pid: int
    camera: int
    index: int


@dataclasses.dataclass(frozen=True)
class ReidDataset:
    name: str
    root: str
    train: list[Record]
    query: list[Record]
    gallery: list[Record]

    @property
    def num_cameras(self) -> int:
        """1 + the largest 0-based camera id over all splits."""
        return 1 + max(r.camera for s in (self.train, self.query, self.gallery) for r in s)

    def split(self, name: str) -> list[Record]:
        if name not in ("train", "query", "gallery"):
            raise ValueError(f"unknown split {name!r}; expected train, query or gallery")
        return getattr(self, name)


# Layout description shown when a root is wrong: what the folder must hold and
# where the data comes from.
LAYOUT_HINTS = {
    "market1501": (
        "expected bounding_box_train/, query/ and bounding_box_test/ "
        "(Market-1501-v15.09.15.zip from the dataset authors' page, unzipped)"
    ),
    "dukemtmc": (
        "expected bounding_box_train/, query/ and bounding_box_test/ (DukeMTMC-reID.zip, unzipped)"
    ),
    "msmt17_v1": (
        "expected train/, test/ and list_{train,val,query,gallery}.txt "
        "(MSMT17_V1.tar.gz from the dataset authors, on request)"
    ),
    "msmt17_v2": (
        "expected mask_train_v2/, mask_test_v2/ and list_{train,val,query,gallery}.txt "
        "(MSMT17_V2.tar.gz from the dataset authors, on request)"
    ),
    "market_layout": "expected bounding_box_train/, query/ and bounding_box_test/",
    "cuhk03": (
        "expected bounding_box_train/, query/ and bounding_box_test/ "
        "(CUHK03 crops in Market-1501 layout, e.g. ../shared/data/cuhk03)"
    ),
    "synthetic": "generated on first use by jaxreid.data.synthetic",
}

# Sub-folders the official archives unpack into; a root may point at their parent.
_ARCHIVE_FOLDERS = {
    "market1501": ("Market-1501-v15.09.15", "Market-1501", "market1501"),
    "dukemtmc": ("DukeMTMC-reID", "dukemtmc-reid"),
    "msmt17_v1": ("MSMT17_V1", "MSMT17"),
    "msmt17_v2": ("MSMT17_V2", "MSMT17"),
    "market_layout": (),
    "cuhk03": (),
    "synthetic": (),
}

_MARKET_SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def _error_missing(kind: str, root: str, what: str) -> DataError:
    return DataError(f"{what} under dataset root {root!r} ({kind}): {LAYOUT_HINTS[kind]}")


def _resolve_root(kind: str, root: str, required: Sequence[str]) -> str:
    """Returns the folder that holds `required`, accepting the archive's own
    sub-folder under `root` too."""
    if not root:
        raise DataError(f"no dataset root given for {kind}: set --config.data.root=DIR")
    if not os.path.isdir(root):
        raise DataError(
            f"dataset root {root!r} does not exist ({kind}): {LAYOUT_HINTS[kind]}; "
            "point the root (--config.data.root or --root) at that folder"
        )
    candidates = [root] + [os.path.join(root, sub) for sub in _ARCHIVE_FOLDERS[kind]]
    for candidate in candidates:
        if all(os.path.exists(os.path.join(candidate, r)) for r in required):
            return candidate
    missing = [r for r in required if not os.path.exists(os.path.join(root, r))]
    raise _error_missing(kind, root, f"missing {', '.join(missing)}")


def _list_images(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    return names


def parse_market_name(name: str, folder: str) -> tuple[int, int]:
    """(pid, 1-based camera) of a Market-style file name; DataError if it does
    not parse."""
    match = _MARKET_NAME.match(name)
    if match is None:
        raise DataError(
            f"cannot parse {os.path.join(folder, name)!r}: Market-1501 names look like "
            "'0002_c1s1_000451_03.jpg' (pid, then _c and the camera number); "
            "rename or remove the file"
        )
    pid, camera = int(match.group(1)), int(match.group(2))
    if camera < 1:
        raise DataError(
            f"camera number 0 in {os.path.join(folder, name)!r}: cameras are numbered "
            "from 1 (c1, c2, ...); rename the file"
        )
    return pid, camera


def _market_split(folder: str, split: str) -> list[tuple[str, int, int]]:
    """(path, pid, camera1) of one Market-layout folder; junk (pid -1) dropped,
    distractors (pid 0) kept in the gallery only."""
    entries = []
    for name in _list_images(folder):
        pid, camera = parse_market_name(name, folder)
        if pid == -1:
            continue  # junk: never evaluated, never trained on
        if pid == 0 and split != "gallery":
            continue  # distractors belong to the gallery alone
        if pid < -1:
            raise DataError(
                f"negative pid {pid} in {os.path.join(folder, name)!r}: only -1 (junk) is "
                "allowed; rename or remove the file"
            )
        entries.append((os.path.join(folder, name), pid, camera))
    return entries


def _to_records(entries: list[tuple[str, int, int]]) -> list[Record]:
    return [
        Record(path=path, pid=pid, camera=camera - 1, index=i)
        for i, (path, pid, camera) in enumerate(entries)
    ]


def _finish(
    kind: str, root: str, splits: dict[str, list[tuple[str, int, int]]], where: dict[str, str]
) -> ReidDataset:
    for split, entries in splits.items():
        if not entries:
            raise DataError(
                f"split {split!r} is empty: no usable images in {where[split]!r} "
                f"({kind}: {LAYOUT_HINTS[kind]})"
            )
    # The dataset's own 1-based camera numbers, made 0-based (not re-packed, so
    # camera ids mean the same thing whatever subset of files is present).
    return ReidDataset(
        name=kind,
        root=root,
        train=_to_records(splits["train"]),
        query=_to_records(splits["query"]),
        gallery=_to_records(splits["gallery"]),
    )


def read_market_layout(root: str, kind: str = "market_layout") -> ReidDataset:
    """Market-1501, DukeMTMC-reID, CUHK03-as-Market, synthetic: three folders of
    'PPPP_cC...' images."""
    base = _resolve_root(kind, root, list(_MARKET_SPLITS.values()))
    folders = {split: os.path.join(base, sub) for split, sub in _MARKET_SPLITS.items()}
    for split, folder in folders.items():
        if not os.path.isdir(folder):
            raise _error_missing(kind, base, f"{_MARKET_SPLITS[split]} is not a folder")
    splits = {split: _market_split(folder, split) for split, folder in folders.items()}
    return _finish(kind, base, splits, folders)


def _read_msmt_list(list_path: str, image_dir: str) -> list[tuple[str, int, int]]:
    entries = []
    with open(list_path) as f:
        for line_number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(
                    f"{list_path}:{line_number}: expected '<relative image path> <pid>', "
                    f"got {line!r}; fix the list file"
                )
            rel_path, pid = parts[0], int(parts[1])
            match = _MSMT_NAME.match(os.path.basename(rel_path))
            if match is None:
                raise DataError(
                    f"{list_path}:{line_number}: cannot parse camera from {rel_path!r}: "
                    "MSMT17 names look like '0000_000_01_0303morning_0015_0.jpg'; fix the list"
                )
            path = os.path.join(image_dir, rel_path)
            if not os.path.isfile(path):
                raise DataError(
                    f"{list_path}:{line_number} names {path!r}, which does not exist; "
                    "restore the image or remove the line"
                )
            entries.append((path, pid, int(match.group(3))))
    return entries


def read_msmt17(root: str, version: int) -> ReidDataset:
    """MSMT17 from its list files. v1 keeps images in train/ and test/, v2 in
    mask_train_v2/ and mask_test_v2/. Train = list_train + list_val, the usual
    unsupervised protocol (labels are never read for training)."""
    kind = f"msmt17_v{version}"
    train_dir, test_dir = ("train", "test") if version == 1 else ("mask_train_v2", "mask_test_v2")
    lists = {
        "train": ["list_train.txt", "list_val.txt"],
        "query": ["list_query.txt"],
        "gallery": ["list_gallery.txt"],
    }
    required = [train_dir, test_dir, "list_train.txt", "list_query.txt", "list_gallery.txt"]
    base = _resolve_root(kind, root, required)
    splits, where = {}, {}
    for split, names in lists.items():
        image_dir = os.path.join(base, train_dir if split == "train" else test_dir)
        entries = []
        for name in names:
            list_path = os.path.join(base, name)
            if name == "list_val.txt" and not os.path.exists(list_path):
                continue
            entries += _read_msmt_list(list_path, image_dir)
        splits[split], where[split] = entries, os.path.join(base, names[0])
    return _finish(kind, base, splits, where)


def detect_format(root: str) -> str:
    """Guesses the layout of `root` (used by the stats CLI when --format is not
    given)."""
    for kind in ("msmt17_v2", "msmt17_v1"):
        try:
            _resolve_root(
                kind,
                root,
                ["mask_train_v2" if kind == "msmt17_v2" else "train", "list_query.txt"],
            )
            return kind
        except DataError:
            pass
    return "market_layout"


def _skipped_line(root: str, what: str, links: list[str]) -> str:
    shown = ", ".join(repr(link) for link in links[:5]) + (" ..." if len(links) > 5 else "")
    return f"{root}: skipped {len(links)} {what}: {shown}"


def list_images_recursive(root: str, log: Callable[[str], None] | None = None) -> list[str]:
    """Paths of every image under `root` at any depth, relative to it, sorted;
    DataError when there is none.

    Linked sub-folders are followed (a tree of links to the cameras of several
    disks is one dataset). A link to a folder already listed -- a cycle, or a
    second link to the same folder -- is skipped, as is a broken link; each
    kind is counted and named in one line to `log` (default: absl's warning).
    """
    paths, repeated, broken = [], [], []
    seen = {os.path.realpath(root)}
    for parent, folders, names in os.walk(root, followlinks=True):
        kept = []
        for folder in sorted(folders):
            path = os.path.join(parent, folder)
            real = os.path.realpath(path)
            if real in seen:
                repeated.append(os.path.relpath(path, root))
                continue
            seen.add(real)
            kept.append(folder)
        folders[:] = kept  # os.walk descends into these only
        for name in names:
            path = os.path.join(parent, name)
            if os.path.islink(path) and not os.path.exists(path):
                broken.append(os.path.relpath(path, root))
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.relpath(path, root))
    if repeated or broken:
        if log is None:
            from absl import logging as absl_logging

            log = absl_logging.warning
        if repeated:
            what = "link(s) to a folder already listed (a cycle or a second link to it)"
            log(_skipped_line(root, what, repeated))
        if broken:
            log(_skipped_line(root, "broken link(s)", broken))
    if not paths:
        raise DataError(
            f"no images under {root!r} (looked for {', '.join(IMAGE_EXTENSIONS)} at any depth)"
        )
    return sorted(paths)


def read_folder(
    root: str, cameras: str = "subfolder", log: Callable[[str], None] | None = None
) -> ReidDataset:
    r"""Unlabelled crops: every image under `root` at any depth (sorted) is a
    training image of unknown identity (pid -1); no query or gallery.

    `cameras`: "subfolder" -- the first sub-folder of the image's path names its
    camera (images directly under root share one); "none" -- one camera; or a
    regular expression whose first group, searched in the path relative to
    root, names the camera (e.g. r"_c(\d+)" for Market-style names). Camera
    names become ids 0..C-1 in sorted order (numerically when all are numbers).
    Linked sub-folders are followed (list_images_recursive; what it skips goes
    to `log`).
    """
    if not root or not os.path.isdir(root):
        raise DataError(
            f"folder dataset root {root!r} is not a folder: point --config.data.root at "
            "the folder of crops"
        )
    paths = list_images_recursive(root, log)
    if cameras == "none":
        names = [""] * len(paths)
    elif cameras == "subfolder":
        names = [p.split(os.sep)[0] if os.sep in p else "" for p in paths]
    else:
        try:
            pattern = re.compile(cameras)
        except re.error as e:
            raise DataError(f"data.folder_cameras {cameras!r} is not a valid regex ({e})") from e
        names = []
        for p in paths:
            match = pattern.search(p)
            if match is None or not match.groups() or match.group(1) is None:
                raise DataError(
                    f"data.folder_cameras {cameras!r} finds no camera (first group) in "
                    f"{os.path.join(root, p)!r}; fix the pattern (its first group must "
                    "match: not optional) or move the file"
                )
            names.append(match.group(1))
    unique = sorted(set(names), key=lambda n: (0, int(n), n) if n.isdigit() else (1, 0, n))
    ids = {name: i for i, name in enumerate(unique)}
    train = [
        Record(path=os.path.join(root, p), pid=-1, camera=ids[n], index=i)
        for i, (p, n) in enumerate(zip(paths, names, strict=True))
    ]
    return ReidDataset(name="folder", root=root, train=train, query=[], gallery=[])


def _read_synthetic(root: str) -> ReidDataset:
    from jaxreid.data import synthetic

    try:
        # Idempotent: returns at once when the folder holds the same set.
        synthetic.generate(root, **synthetic.DEFAULT_SYNTHETIC)
    except (FileExistsError, ValueError) as e:
        raise DataError(f"synthetic set at {root!r}: {e}") from e
    return read_market_layout(root, kind="synthetic")


def _read_luperson(root: str) -> ReidDataset:
    from jaxreid.data.luperson import read_luperson  # lmdb stays an optional import

    return read_luperson(root)


READERS: dict[str, Callable[[str], ReidDataset]] = {
    "market1501": lambda root: read_market_layout(root, kind="market1501"),
    "dukemtmc": lambda root: read_market_layout(root, kind="dukemtmc"),
    "cuhk03": lambda root: read_market_layout(root, kind="cuhk03"),
    "market_layout": read_market_layout,
    "msmt17_v1": lambda root: read_msmt17(root, version=1),
    "msmt17_v2": lambda root: read_msmt17(root, version=2),
    "synthetic": _read_synthetic,
    "folder": read_folder,
    "luperson": _read_luperson,
}


def load_dataset(
    name: str,
    root: str,
    folder_cameras: str = "subfolder",
    log: Callable[[str], None] | None = None,
) -> ReidDataset:
    """Reads dataset `name` (a key of READERS, or 'auto') from `root`;
    `folder_cameras` is the camera rule of the "folder" dataset (read_folder),
    `log` takes its notes (links skipped)."""
    if name == "auto":
        name = detect_format(root)
    if name not in READERS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(READERS))}")
    root = os.path.abspath(os.path.expanduser(root))
    if name == "folder":
        return read_folder(root, folder_cameras, log)
    return READERS[name](root)


def split_stats(records: Sequence[Record]) -> dict[str, int]:
    return {
        "images": len(records),
        "ids": len({r.pid for r in records}),
        "cameras": len({r.camera for r in records}),
    }


def dataset_stats(dataset: ReidDataset) -> dict[str, dict[str, int]]:
    """The usual table: images / identities / cameras per split."""
    return {split: split_stats(dataset.split(split)) for split in ("train", "query", "gallery")}
