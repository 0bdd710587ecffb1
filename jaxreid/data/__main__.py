"""Dataset tools: `python -m jaxreid.data stats --root DIR [--format F] [--json]`."""

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
    args = parser.parse_args(argv)
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
