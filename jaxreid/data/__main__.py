"""Dataset tools.

    python -m jaxreid.data stats --root DIR [--format F] [--json]
    python -m jaxreid.data build --root DIR --format F --data_dir OUT

`build` writes the TFDS (array_record) version of a dataset, the same as
`tfds build --imports=jaxreid.data.tfds_builders reid_<format> --manual_dir=DIR`
(tensorflow-datasets 4.9.10's own CLI imports apache_beam at start-up, which
jaxreid does not install).
"""

from __future__ import annotations

import json
import sys

from absl import flags

from jaxreid.command_line import HELP, fail, parse, run
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


def _build(args: flags.FlagValues) -> int:
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


PROG = "python -m jaxreid.data"


def _stats_flags(fv: flags.FlagValues) -> None:
    """stats: images / identities / cameras per split."""
    flags.DEFINE_string("root", None, "dataset folder", flag_values=fv, required=True)
    flags.DEFINE_enum(
        "format",
        "auto",
        ["auto", *sorted(READERS)],
        "layout of --root (default: detect)",
        flag_values=fv,
    )
    flags.DEFINE_bool("json", False, "print one JSON object", flag_values=fv)


def _build_flags(fv: flags.FlagValues) -> None:
    """build: write the TFDS array_record version."""
    flags.DEFINE_string(
        "root", None, "dataset folder (the TFDS manual_dir)", flag_values=fv, required=True
    )
    flags.DEFINE_enum(
        "format", None, sorted(_BUILDERS), "layout of --root", flag_values=fv, required=True
    )
    flags.DEFINE_string(
        "data_dir", None, "TFDS data_dir to write into", flag_values=fv, required=True
    )


COMMANDS = {"stats": _stats_flags, "build": _build_flags}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command not in COMMANDS:
        if set(argv) & set(HELP):
            print(f"usage: {PROG} {{stats,build}} [flags] (--help after the command lists them)")
            for define in COMMANDS.values():
                print(f"  {define.__doc__}")
            return 0
        fail(PROG, f"the first argument is the command: {' or '.join(COMMANDS)}")
    args, _ = parse(COMMANDS[command], argv[1:], f"{PROG} {command}")
    if command == "build":
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
    run(main)
