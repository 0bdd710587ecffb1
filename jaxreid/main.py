"""The one entry point.

    python -m jaxreid.main --config=configs/synthetic.py --workdir=/tmp/w
    python -m jaxreid.main --config=configs/cuhk03.py --workdir=/tmp/c --mode=eval
    python -m jaxreid.main --config=configs/market.py --config.data.root=/data/market

Every config value can be overridden on the command line
(`--config.train.epochs=2`). The workdir receives `log.txt`, `results.json`,
`metrics.jsonl`, TensorBoard summaries and checkpoints; running the same
command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (log, results, checkpoints).")
_MODE = flags.DEFINE_enum("mode", None, ["train", "eval"], "Overrides config.mode.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess",
    False,
    "Join a multi-process run with jax.distributed.initialize() (one process per host; "
    "coordinator and ranks detected from the cluster environment, e.g. SLURM; "
    "JAX_COORDINATOR_ADDRESS overrides the coordinator).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "With --multiprocess: host:port of process 0 (default: from the cluster environment).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --multiprocess: number of processes (default: detected)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --multiprocess: rank of this process (default: detected)."
)
flags.mark_flags_as_required(["config", "workdir"])


def _start_distributed() -> None:
    """jax.distributed.initialize with the explicit flags or auto-detection
    (SLURM, Open MPI, ...). CPU processes exchange collectives through gloo."""
    import jax

    if jax.config.jax_platforms in (None, "", "cpu") and not _has_accelerator():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )


def _has_accelerator() -> bool:
    import importlib.util

    # Must not initialise a backend before jax.distributed.initialize.
    return any(
        importlib.util.find_spec(name) is not None
        for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
    )


def _setup_logging(workdir: str, process: int) -> logging.Logger:
    logger = logging.getLogger("jaxreid")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers.clear()
    prefix = f"[process {process}] " if process else ""
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S")
    name = f"log.process{process}.txt" if process else "log.txt"
    for handler in (
        logging.FileHandler(os.path.join(workdir, name)),
        logging.StreamHandler(sys.stdout),
    ):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def run_eval(config, workdir: str, data, log) -> dict:
    """--mode=eval: a checkpoint (or the initial model) on query/gallery."""
    from jaxreid.checkpoints import load_model_for_eval
    from jaxreid.methods import prepare_config
    from jaxreid.train import evaluate_features, format_metrics, query_gallery_features

    config = prepare_config(config, data.train.pids)
    path = config.eval.checkpoint or os.path.join(workdir, "checkpoints", "latest")
    if config.eval.checkpoint and not os.path.isdir(path):
        from jaxreid.utils import UserError

        raise UserError(
            f"checkpoint folder {path!r} does not exist; check --config.eval.checkpoint"
        )
    graphdef, params, batch_stats, source = load_model_for_eval(config, path)
    log(f"evaluating the {source}")
    q, g = query_gallery_features(config, graphdef, params, batch_stats, data)
    results = evaluate_features(config, q, g, data)
    log(format_metrics("evaluation", results))
    if config.eval.plots:
        _write_plots(config, q, g, data, workdir, log)
    return {"eval": results, "source": source}


def _write_plots(config, q, g, data, workdir, log) -> None:
    """Ranked-list grid and CMC curve from the features just evaluated."""
    import numpy as np

    from jaxreid import evaluate
    from jaxreid.evaluate import plots

    distance = evaluate.cosine_distance(q["global"], g["global"])
    rng = np.random.default_rng(config.seed)
    count = min(config.eval.num_plot_queries, len(data.query.records))
    chosen = np.sort(rng.choice(len(data.query.records), count, replace=False))
    grid = os.path.join(workdir, "ranked_lists.png")
    plots.ranked_list_grid(
        distance,
        data.query.paths,
        data.gallery.paths,
        data.query.pids,
        data.gallery.pids,
        data.query.cameras,
        data.gallery.cameras,
        chosen,
        grid,
    )
    metrics = evaluate.evaluate_ranking(
        distance,
        data.query.pids,
        data.gallery.pids,
        data.query.cameras,
        data.gallery.cameras,
        max_rank=50,
    )
    curve = os.path.join(workdir, "cmc.png")
    plots.cmc_curve_plot({"global cosine": metrics["cmc"]}, curve)
    log(f"wrote {grid} and {curve}")


def main(argv) -> None:
    del argv
    if _MULTIPROCESS.value:
        _start_distributed()
    # Libraries (jax's backend probe, orbax, clu) log through absl at INFO;
    # keep the console for ours (set before jax initialises its backends).
    absl_logging.set_verbosity(absl_logging.WARNING)
    import jax

    from jaxreid.utils import UserError, machine_description
    from jaxreid.validate import prepare_workdir, validate

    config = _CONFIG.value
    mode = _MODE.value or config.mode
    try:
        validate(config, mode)
        workdir = prepare_workdir(_WORKDIR.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    process = jax.process_index()
    logger = _setup_logging(workdir, process)
    log = logger.info

    started = time.time()
    log(f"jaxreid {mode}: {machine_description()}")
    if process == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    try:
        from jaxreid.data.loading import load_data

        data = load_data(config, log)
        if mode == "eval":
            results = run_eval(config, workdir, data, log)
        else:
            from jaxreid.train import TrainingInterrupted, train_and_evaluate

            try:
                results = train_and_evaluate(config, workdir, data, log)
            except TrainingInterrupted as e:
                log(str(e))
                sys.exit(130)
    except (UserError, FloatingPointError) as e:
        log(f"error: {e}")
        sys.exit(2)
    results.update(
        mode=mode,
        config=json.loads(config.to_json_best_effort()),
        machine=machine_description(),
        wall_time_s=time.time() - started,
    )
    if process:
        return
    path = os.path.join(workdir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    log(f"wrote {path}")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with config override mistakes (unknown key, wrong type,
    bad config file) as one line and exit status 2 instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e} (--helpfull lists the flags)", file=sys.stderr)
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


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
