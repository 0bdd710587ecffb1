"""absl command lines: every entry point parses its flags here.

`parse_config_flags` / `run_with_config` serve the entry points with a
`--config` file (`python -m jaxreid.main`, the quality benchmarks): the
config's folder on sys.path (a config imports configs/recipes.py), override
mistakes as one line, and `--config.method.*` applied after the method is
known. `parse` / `run` serve the tools whose modules are also imported as
libraries: `python -m jaxreid.data`, `jaxreid.data.synthetic`,
`jaxreid.evaluate` and the benchmarks.

Each tool defines its flags on its own `FlagValues` when its command runs
(`parse`), so importing its module adds nothing to absl's global flags (no
clash between two tools' --root) and its `main(argv)` can run again in the
same process. `run` is `app.run` for such a main. A flag mistake is one line
on stderr and exit status 2; a dashed spelling (--num-ids) is read as absl's
(--num_ids), and a boolean also takes absl's --noflag.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import ml_collections
from absl import app, flags

from jaxreid.utils import UserError

HELP = ("-h", "--help", "--helpshort", "--helpfull")


def fail(prog: str, message: object) -> NoReturn:
    message = "; ".join(str(message).splitlines())
    print(f"{prog}: error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def _respell(args: Sequence[str], fv: flags.FlagValues) -> list[str]:
    """--lam-g=1 -> --lam_g=1 where lam_g is a flag (nothing after `--`)."""
    out = []
    for position, arg in enumerate(args):
        if arg == "--":
            return out + list(args[position:])
        name, eq, value = arg[2:].partition("=")
        canonical = name.replace("-", "_")
        if arg.startswith("--") and name != canonical and canonical in fv:
            arg = f"--{canonical}{eq}{value}"
        out.append(arg)
    return out


def _spread(args: Sequence[str], multi: Sequence[str]) -> list[str]:
    """--sizes 1 2 -> --sizes=1 --sizes=2 for the multi flags named in `multi`."""
    out, name = [], None
    for arg in args:
        if name and not arg.startswith("-"):
            if out[-1] == f"--{name}":
                out.pop()  # the bare flag, replaced by its values
            out.append(f"--{name}={arg}")
            continue
        name = arg[2:] if arg.startswith("--") and arg[2:] in multi else None
        out.append(arg)
    return out


def parse(
    define: Callable[[flags.FlagValues], None],
    argv: Sequence[str] | None,
    prog: str,
    positional: int = 0,
    multi: Sequence[str] = (),
) -> tuple[flags.FlagValues, list[str]]:
    """(the flags `define` declares, parsed from argv (default sys.argv[1:]);
    the positional arguments, at most `positional` of them). The multi flags
    named in `multi` also take argparse's `--flag A B` for `--flag=A --flag=B`."""
    fv = flags.FlagValues()
    define(fv)
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in HELP for arg in args):
        about = f"\n{define.__doc__}\n" if define.__doc__ else ""
        print(f"usage: {prog} [flags]\n{about}{fv.get_help(include_special_flags=False)}")
        sys.exit(0)
    try:
        rest = fv([prog, *_spread(_respell(args, fv), multi)])[1:]
    except flags.Error as e:
        fail(prog, e)
    if len(rest) > positional:
        fail(prog, f"unrecognized arguments: {' '.join(rest[positional:])}")
    return fv, rest


def run(main: Callable[[list[str]], int | None]) -> None:
    """app.run(main) for a main(argv) that parses its own flags (`parse`):
    absl's global flags stay at their defaults."""
    app.run(lambda argv: main(argv[1:]), flags_parser=_global_defaults)


def _global_defaults(argv: list[str]) -> list[str]:
    flags.FLAGS(argv[:1])
    return argv


METHOD_PREFIX = "--config.method."


def _split_method_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """argv without its `--config.method.KEY[=VALUE]` overrides, and those as
    (KEY, VALUE or None for a bare boolean), in order."""
    rest, overrides = [], []
    for position, arg in enumerate(argv):
        if position == 0 or not arg.startswith(METHOD_PREFIX):
            rest.append(arg)
            continue
        key, eq, value = arg[len(METHOD_PREFIX) :].partition("=")
        following = argv[position + 1] if position + 1 < len(argv) else "--"
        if not eq and not following.startswith("-"):
            raise UserError(
                f"{arg} {following}: write method settings as {arg}={following} "
                "(the method's settings are read after its name)"
            )
        overrides.append((key, value if eq else None))
    return rest, overrides


def _parse_setting(key: str, raw: str | None, default):
    """`raw` (None: a bare `--config.method.KEY`, i.e. True) as the type of the
    setting's default."""
    import ast

    if isinstance(default, bool):
        words = {"true": True, "1": True, "false": False, "0": False}
        value = True if raw is None else words.get(raw.lower())
        if value is None:
            raise UserError(f"--config.method.{key}={raw}: must be true or false")
        return value
    if raw is None:
        raise UserError(f"--config.method.{key}: give a value, --config.method.{key}=...")
    try:
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, str):
            return raw
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        kind = type(default).__name__
        raise UserError(f"--config.method.{key}={raw}: must be a {kind}") from None


def apply_method_overrides(
    config: ml_collections.ConfigDict, overrides: list[tuple[str, str | None]]
) -> None:
    """Applies `--config.method.*` overrides after the rest of the command line:
    `module` and `name` first (a new name replaces the block with that method's
    declared settings), then the settings, each of which the chosen method
    must declare. An unknown name or module is left for `validate` to report."""
    from jaxreid.methods import BLOCK_KEYS, method_config, method_settings, unknown_settings_line

    given = dict((key, raw) for key, raw in overrides if key in BLOCK_KEYS)
    module = given.get("module", config.method.get("module", ""))
    name = given.get("name", config.method.name)
    try:
        declared = method_settings(name, module)
    except (ImportError, ValueError):
        with config.unlocked():
            config.method.update({k: v or "" for k, v in given.items()})
        return
    with config.unlocked():
        if name != config.method.name:
            config.method = method_config(name, module)
        config.method.module = module
    settings = [(key, raw) for key, raw in overrides if key not in BLOCK_KEYS]
    unknown = sorted({key for key, _ in settings if key not in declared})
    if unknown:
        raise UserError(unknown_settings_line(name, unknown, declared))
    for key, raw in settings:
        config.method[key] = _parse_setting(key, raw, declared[key])


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl's parser (`flags.FLAGS`) for an entry point with a `--config`
    file (ml_collections' config flag named "config"), with config override mistakes (unknown
    key, wrong type, bad config file) as one line and exit status 2 instead
    of a traceback. The config file's folder goes on sys.path first, so that
    it imports its siblings (configs/recipes.py); `--config.method.*`
    overrides are applied after the rest (apply_method_overrides)."""
    for position, arg in enumerate(argv):
        path = arg[len("--config=") :] if arg.startswith("--config=") else None
        if arg == "--config" and position + 1 < len(argv):
            path = argv[position + 1]
        if path:
            file = path.split(":")[0]
            if not os.path.isfile(file):
                print(
                    f"error: --config={path}: no such file {file!r}; pass a config file, "
                    "e.g. --config=configs/synthetic.py",
                    file=sys.stderr,
                )
                sys.exit(2)
            sys.path.insert(0, os.path.dirname(os.path.abspath(file)))
    try:
        argv, method_overrides = _split_method_overrides(argv)
        # ml_collections reads its override names from sys.argv itself.
        full_argv, sys.argv = sys.argv, argv
        try:
            remaining = flags.FLAGS(argv)
        finally:
            sys.argv = full_argv
        if method_overrides:
            apply_method_overrides(flags.FLAGS.config, method_overrides)
        return remaining
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        message = str(e)
        if "Traceback" in message:  # the config file's get_config raised: its last line
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            first = lines[0].removesuffix(":").replace("Error whilst parsing config file", "")
            message = f"{first.rstrip(': ')}: the config file raised {lines[-1]}"
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        print(f"error: {message} (--helpfull lists the flags)", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:
        key = str(e).strip("\"'")
        bad = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0]]
        print(
            f"error: unknown config key {key!r} in {' '.join(bad) or 'the overrides'}; "
            "check the spelling against the config file (e.g. --config.train.epochs=2)",
            file=sys.stderr,
        )
        sys.exit(2)
    except (TypeError, ValueError) as e:
        print(f"error: bad config file or override: {e}", file=sys.stderr)
        sys.exit(2)


def run_with_config(main: Callable[[list[str]], None]) -> None:
    """app.run(main) for an entry point whose flags include a `--config` file
    (jaxreid.main, the quality benchmarks), parsed by parse_config_flags."""
    app.run(main, flags_parser=parse_config_flags)
