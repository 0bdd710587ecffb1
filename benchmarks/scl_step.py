"""SCL step cost without the model: selection + loss (fwd + bwd) + bank updates,
through the method the training loop calls (jaxreid.methods.scl).

Compares with the released PyTorch code on a 2-core CPU (scl-method.md): 0.42 s
per step at batch 8 (selection 0.12 s + contrastive loss fwd + bwd 0.30 s),
N = 12,936 bank rows, D = 2048, P = 8, k = 7, n = 500. Target: >= 5x faster.

    python benchmarks/scl_step.py                      # batches 8 and 32, N = 12,936
    python benchmarks/scl_step.py --scaling 100000x2048,1000000x256 --repeats 3

Every function is compiled once (plain jax.jit) and timed after two warm-up
calls with `block_until_ready`; the table gives the median and [min-max] of
`--repeats` calls. "loss fwd" is the method's loss (selection included),
"fwd+bwd" with its gradient, "updates" the method's bank update, "step" one
compiled function doing all of it with the banks donated (updated in place)
and the writes ordered after the gradients, as the train step does.
`--scaling` times selection alone at larger N (rows x D, P = 8) where memory
allows.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags

from jaxreid.command_line import parse, run
from jaxreid.config_base import base_config
from jaxreid.host import configure_host
from jaxreid.methods import Batch, get_method
from jaxreid.methods.scl import banks as memory
from jaxreid.methods.scl import selection
from jaxreid.step import computed_after
from jaxreid.utils import l2_normalize, machine_description

RELEASE_SECONDS = {"selection": 0.12, "loss": 0.30, "total": 0.42}  # batch 8, same CPU


def random_banks(
    rng: jax.Array, num_rows: int, dim: int, stripes: int, dtype: str = "float32"
) -> memory.SCLBanks:
    k_g, k_l, k_m, k_c = jax.random.split(rng, 4)
    g = l2_normalize(jax.random.normal(k_g, (num_rows, dim)))
    st = l2_normalize(jax.random.normal(k_l, (num_rows, stripes, dim // stripes)))
    banks = memory.init_banks(g, st, jax.random.randint(k_c, (num_rows,), 0, 6), dtype=dtype)
    # A bank past the first epoch: non-zero mixture rows.
    mixture = l2_normalize(jax.random.normal(k_m, (num_rows, dim))).astype(dtype)
    return banks.replace(mixture_bank=mixture)


def random_batch(rng: jax.Array, banks: memory.SCLBanks, batch: int):
    k_i, k_g, k_l = jax.random.split(rng, 3)
    n, d = banks.global_bank.shape
    p, _, dp = banks.local_bank.shape
    idx = jax.random.choice(k_i, n, (batch,), replace=False).astype(jnp.int32)
    g = l2_normalize(banks.global_bank[idx] + 0.5 * jax.random.normal(k_g, (batch, d)) / d**0.5)
    st = jnp.transpose(banks.local_bank[:, idx], (1, 0, 2))
    st = l2_normalize(st + 0.5 * jax.random.normal(k_l, (batch, p, dp)) / dp**0.5)
    return idx, banks.cameras[idx], g, st


def time_calls(fn, args, repeats: int, feed_back: bool = False) -> list[float]:
    """Seconds per call; with feed_back the first argument is replaced by the output's first."""
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        if i >= 2:
            times.append(time.perf_counter() - start)
        if feed_back:
            args = (out[0], *args[1:])
    return times


def fmt(times: list[float]) -> str:
    return f"{1e3 * statistics.median(times):.1f} [{1e3 * min(times):.1f}-{1e3 * max(times):.1f}]"


def scl_config(args):
    config = base_config()
    m = config.method
    m.k, m.n, m.approx_topk, m.mixture_update = args.k, args.n, args.approx, args.mode
    if args.block_size:
        m.selection_block = args.block_size
    return config


def bench_batch(args, banks: memory.SCLBanks, batch: int) -> dict[str, list[float]]:
    idx, cams, g, st = random_batch(jax.random.key(batch), banks, batch)
    method = get_method(scl_config(args))
    phase = "select"
    key = jax.random.key(0)

    def loss(banks, batch_, g, st):
        return method.loss({"global": g, "stripes": st}, banks, batch_, key, phase)

    def loss_grad(banks, batch_, g, st):
        (value, cand), grads = jax.value_and_grad(
            lambda g, st: loss(banks, batch_, g, st)[:2], argnums=(0, 1), has_aux=True
        )(g, st)
        return value, cand, grads

    def update(banks, batch_, g, st, cand):
        return method.update(banks, {"global": g, "stripes": st}, batch_, cand, phase)

    def step(banks, batch_, g, st):
        value, cand, grads = loss_grad(banks, batch_, g, st)
        outputs = computed_after({"global": g, "stripes": st}, (cand, grads))
        return method.update(banks, outputs, batch_, cand, phase), value, grads

    batch_ = Batch(indices=idx, cameras=cams)
    cand = jax.jit(loss)(banks, batch_, g, st)[1]
    results = {
        "loss": time_calls(jax.jit(loss), (banks, batch_, g, st), args.repeats),
        "loss_grad": time_calls(jax.jit(loss_grad), (banks, batch_, g, st), args.repeats),
    }
    banks_copy = jax.tree.map(jnp.copy, banks)
    results["updates"] = time_calls(
        jax.jit(lambda b, *rest: (update(b, *rest),), donate_argnums=0),
        (banks_copy, batch_, g, st, cand),
        args.repeats,
        feed_back=True,
    )
    banks_copy = jax.tree.map(jnp.copy, banks)
    results["step"] = time_calls(
        jax.jit(step, donate_argnums=0), (banks_copy, batch_, g, st), args.repeats, feed_back=True
    )
    return results


def bench_scaling(args, rows: int, dim: int, batch: int) -> list[float]:
    banks = random_banks(jax.random.key(rows), rows, dim, args.stripes, args.bank_dtype)
    banks = banks.replace(mixture_bank=jnp.zeros((1, dim)))  # not used: free its memory
    idx, cams, g, st = random_batch(jax.random.key(1), banks, batch)
    select = jax.jit(
        functools.partial(
            selection.select_candidates,
            k=args.k,
            n=args.n,
            block_size=args.block_size,
            use_approx=args.approx,
            unit_rows=True,  # as the method: bank rows are unit-norm
        )
    )
    return time_calls(select, (g, st, idx, cams, banks), args.repeats)


PROG = "benchmarks/scl_step.py"


def define_flags(fv: flags.FlagValues) -> None:
    """SCL step cost without the model (see the module docstring)."""
    flags.DEFINE_integer("num_rows", 12936, "bank rows N", flag_values=fv)
    flags.DEFINE_integer("dim", 2048, "feature dimension D", flag_values=fv)
    flags.DEFINE_integer("stripes", 8, "stripes P", flag_values=fv)
    flags.DEFINE_integer("k", 7, "SCL k", flag_values=fv)
    flags.DEFINE_integer("n", 500, "SCL n", flag_values=fv)
    flags.DEFINE_string("batch_sizes", "8,32", "comma-separated batch sizes", flag_values=fv)
    flags.DEFINE_integer(
        "block_size", None, "bank rows per selection block (default: automatic)", flag_values=fv
    )
    flags.DEFINE_enum(
        "mode",
        base_config().method.mixture_update,
        ["vectorized", "sequential"],
        "mixture-bank update mode (default: the training default, method.mixture_update)",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "bank_dtype",
        "float32",
        ["float32", "bfloat16"],
        "bfloat16 is for accelerators: XLA:CPU upcasts bf16 scatters",
        flag_values=fv,
    )
    flags.DEFINE_bool("approx", False, "lax.approx_min_k selection", flag_values=fv)
    flags.DEFINE_integer("repeats", 7, "timed calls", flag_values=fv)
    flags.DEFINE_string(
        "scaling", "", "selection only at ROWSxDIM[,ROWSxDIM...], e.g. 100000x2048", flag_values=fv
    )
    flags.DEFINE_integer("scaling_batch", 8, "batch of the scaling points", flag_values=fv)
    flags.DEFINE_float(
        "max_bank_gib", 6.0, "skip scaling points whose G + L banks exceed this", flag_values=fv
    )


def main(argv: list[str] | None = None) -> None:
    configure_host()  # before jax starts a backend
    args, _ = parse(define_flags, argv, PROG)

    print(
        f"# SCL step without the model: N = {args.num_rows:,}, D = {args.dim}, "
        f"P = {args.stripes}, k = {args.k}, n = {args.n}, block = {args.block_size or 'auto'}, "
        f"updates = {args.mode}{', approx top-k' if args.approx else ''}"
    )
    print(machine_description())
    print()
    banks = random_banks(jax.random.key(0), args.num_rows, args.dim, args.stripes, args.bank_dtype)
    print(
        "| batch | loss fwd (incl. selection) ms | loss fwd+bwd ms | bank updates ms "
        "| one compiled step ms | release (PyTorch) ms | speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        res = bench_batch(args, banks, batch)
        if batch == 8:
            release = f"{1e3 * RELEASE_SECONDS['total']:.0f} (sel 120 + loss 300, no updates)"
            speedup = f"{RELEASE_SECONDS['total'] / statistics.median(res['step']):.1f}x"
        else:
            release, speedup = "n/a", "n/a"
        print(
            f"| {batch} | {fmt(res['loss'])} | {fmt(res['loss_grad'])} | "
            f"{fmt(res['updates'])} | {fmt(res['step'])} | {release} | {speedup} |",
            flush=True,
        )
    del banks

    if args.scaling:
        print()
        print(f"Selection only, batch {args.scaling_batch}, P = {args.stripes}:")
        print()
        print("| bank rows | D | G + L GiB | selection ms |")
        print("|---|---|---|---|")
        for point in args.scaling.split(","):
            rows, dim = (int(v) for v in point.lower().split("x"))
            gib = 2 * rows * dim * jnp.dtype(args.bank_dtype).itemsize / 2**30
            if gib > args.max_bank_gib:
                print(f"| {rows:,} | {dim} | {gib:.1f} | skipped (> --max-bank-gib) |")
                continue
            times = bench_scaling(args, rows, dim, args.scaling_batch)
            print(f"| {rows:,} | {dim} | {gib:.2f} | {fmt(times)} |", flush=True)


if __name__ == "__main__":
    run(main)
