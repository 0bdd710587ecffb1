"""Dataset tools.

    python -m jaxreid.data stats --root DIR [--format F] [--json]
    python -m jaxreid.data build --root DIR --format F --data_dir OUT

`build` writes the TFDS (array_record) version of a dataset, the same as
`tfds build --imports=jaxreid.data.tfds_builders reid_<format> --manual_dir=DIR`
(tensorflow-datasets 4.9.10's own CLI imports apache_beam at start-up, which
jaxreid does not install).
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxreid.data.datasets import READERS, DataError, dataset_stats, load_dataset


def format_table(stats: dict[str, dict[str, int]]) -> str:
    lines = [f"{'split':<8} {'images':>8} {'ids':>6} {'cameras':>8}"]
    for split, row in stats.items():
        lines.append(f"{split:<8} {row['images']:>8,} {row['ids']:>6,} {row['cameras']:>8}")
    return "\n".join(lines)


_BUILDERS = {
    "market1501": "ReidMarket1501",
    "dukemtmc": "ReidDukemtmc",
    "msmt17_v1": "ReidMsmt17V1",
    "msmt17_v2": "ReidMsmt17V2",
    "cuhk03": "ReidCuhk03",
    "market_layout": "ReidMarketLayout",
}


def _build(args: argparse.Namespace) -> int:
    import tensorflow_datasets as tfds

    from jaxreid.data import tfds_builders

    builder = getattr(tfds_builders, _BUILDERS[args.format])(data_dir=args.data_dir)
    try:
        load_dataset(args.format, args.root)  # our one-line errors before TFDS's own
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=args.root)
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {builder.data_dir}; read it with tfds.data_source({builder.name!r}, "
        f"data_dir={args.data_dir!r})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxreid.data")
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="images / identities / cameras per split")
    stats.add_argument("--root", required=True, help="dataset folder")
    stats.add_argument(
        "--format",
        default="auto",
        choices=["auto", *sorted(READERS)],
        help="layout of --root (default: detect)",
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    build = commands.add_parser("build", help="write the TFDS array_record version")
    build.add_argument("--root", required=True, help="dataset folder (the TFDS manual_dir)")
    build.add_argument("--format", required=True, choices=sorted(_BUILDERS))
    build.add_argument("--data_dir", required=True, help="TFDS data_dir to write into")
    args = parser.parse_args(argv)
    if args.command == "build":
        return _build(args)
    try:
        dataset = load_dataset(args.format, args.root)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = dataset_stats(dataset)
    if args.json:
        print(json.dumps(table))
    else:
        print(f"{dataset.name} at {dataset.root}")
        print(format_table(table))
        cameras = len({r.camera for s in ("train", "query", "gallery") for r in dataset.split(s)})
        print(f"cameras in total: {cameras}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
