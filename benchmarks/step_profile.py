"""Where a compiled train step spends its time: one `jax.profiler` trace of a
few steps of a benchmarks/train_step.py row, time per XLA op summed by kind
(convolution, matrix product, other) and the slowest ops.

    python benchmarks/step_profile.py --row r50_scl8
    python benchmarks/step_profile.py --row lite0_sup --top 30
    python benchmarks/step_profile.py --config synthetic.py   # the README's main command
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax
from absl import flags
from jax_step import JaxStep, load_config
from train_step import ROWS, apply

from jaxreid.command_line import parse, run
from jaxreid.host import configure_host
from jaxreid.utils import machine_description


def op_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Op name -> (kind, output shape) from the compiled HLO text (a fusion
    by what it computes)."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?(%[\w.\-]+) .*\{$", line)
        if header:
            current = bodies.setdefault(header.group(1), [])
        elif current is not None:
            current.append(re.sub(r", metadata=\{.*", "", line))
    kinds = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        body = opcode
        if opcode == "fusion":
            called = re.search(r"calls=(%[\w.\-]+)", line)
            body = "\n".join(bodies.get(called.group(1), [])) if called else ""
        kind = "other"
        if opcode == "convolution" or " convolution(" in body:
            kind = "convolution"
        elif opcode == "dot" or " dot(" in body:
            kind = "dot"
        kinds[name] = (kind, shape)
    return kinds


PROG = "benchmarks/step_profile.py"


def define_flags(fv: flags.FlagValues) -> None:
    """Where a train step's time goes, per XLA op (see the module docstring)."""
    flags.DEFINE_string("row", "r50_scl8", f"one of {', '.join(ROWS)}", flag_values=fv)
    flags.DEFINE_string(
        "config", "", "a file of configs/ instead of a row (e.g. synthetic.py)", flag_values=fv
    )
    flags.DEFINE_integer("images", 512, "random images with --config", flag_values=fv)
    flags.DEFINE_integer("steps", 3, "traced steps", flag_values=fv)
    flags.DEFINE_integer("top", 15, "slowest ops listed", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG)
    if args.config:
        config, overrides, num_images, label = args.config, {}, args.images, args.config
    else:
        config, overrides, num_images, label = ROWS[args.row]
    step = JaxStep(apply(load_config(config), overrides), num_images)
    for i in range(2):  # compile and warm up
        step.run(i)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for i in range(args.steps):
                step.run(2 + i)
        (trace,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    op_ms = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            op_ms[e["name"]] += e["dur"] / 1000 / args.steps
    hlo = step.step.lower(step.state, step.arrays, step.batches, 0, step.phase).compile().as_text()
    kinds = op_kinds(hlo)
    print(machine_description())
    print(f"{label}: {args.steps} steps traced; ms per step")
    by_kind = collections.Counter()
    for name, ms in op_ms.items():
        if name in kinds:
            by_kind[kinds[name][0]] += ms
    print(f"  all ops {sum(by_kind.values()):.0f} (loops and waits not included)")
    for kind, ms in by_kind.most_common():
        print(f"  {kind:12s} {ms:.0f}")
    print(f"slowest {args.top} ops:")
    ranked = [(ms, n) for n, ms in op_ms.items() if n in kinds]
    for ms, name in sorted(ranked, reverse=True)[: args.top]:
        print(f"  {ms:7.1f}  {kinds[name][0]:12s} {kinds[name][1]}  {name}")


if __name__ == "__main__":
    run(main)
