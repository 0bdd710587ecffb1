"""The one entry point.

    python -m jaxreid.main --config=configs/synthetic.py --workdir=/tmp/w
    python -m jaxreid.main --config=configs/cuhk03.py --workdir=/tmp/c --mode=eval
    python -m jaxreid.main --config=configs/market.py --config.data.root=/data/market
    python -m jaxreid.main --config=configs/pretrain_lite0.py --workdir=/tmp/p  # --mode=pretrain

Every config value can be overridden on the command line
(`--config.train.epochs=2`). The workdir receives `log.txt`, `results.json`
(`results_eval.json` with `--mode=eval`), `metrics.jsonl`, TensorBoard
summaries and checkpoints; running the same command again resumes from the
latest checkpoint. `config.json` records a run's settings: written when it
starts, never by a resume or an evaluation; a resume whose changed settings
the checkpoint cannot take (the model, method, input size) is refused.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxreid.host import configure_host

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (log, results, checkpoints).")
_MODE = flags.DEFINE_enum("mode", None, ["train", "eval", "pretrain"], "Overrides config.mode.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess",
    False,
    "Join a multi-process run with jax.distributed.initialize() (one process per host; "
    "coordinator and ranks from torchrun-style MASTER_ADDR / MASTER_PORT / WORLD_SIZE / "
    "RANK when set, else detected from the cluster environment, e.g. SLURM; "
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


def main(argv) -> None:
    del argv
    configure_host()  # before jax starts a backend
    if _MULTIPROCESS.value:
        from jaxreid.parallel import start_distributed

        start_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # Libraries (jax's backend probe, orbax, clu) log through absl at INFO;
    # keep the console for ours (set before jax initialises its backends).
    absl_logging.set_verbosity(absl_logging.WARNING)
    import jax

    from jaxreid.checkpoints import resume_changes, saved_steps
    from jaxreid.data.loading import load_data
    from jaxreid.evaluate.protocol import run_eval
    from jaxreid.run_io import TrainingInterrupted, setup_logging
    from jaxreid.train import train_and_evaluate
    from jaxreid.utils import UserError, machine_description
    from jaxreid.validate import prepare_workdir, validate

    config = _CONFIG.value
    mode = _MODE.value or config.mode
    try:
        validate(config, mode)
        workdir = prepare_workdir(_WORKDIR.value)
        # A resume keeps the run's config.json; settings the checkpoint cannot
        # take are refused before anything is read.
        resuming = mode in ("train", "pretrain") and bool(saved_steps(workdir))
        settings = json.loads(config.to_json_best_effort())
        changes = resume_changes(workdir, settings) if resuming else []
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    log = setup_logging(workdir, jax.process_index()).info
    started = time.time()
    log(f"jaxreid {mode}: {machine_description()}")
    if changes:
        log(f"resuming with {len(changes)} changed settings: {', '.join(changes)}")
    if mode != "eval" and not resuming and jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    try:
        if mode == "pretrain":  # streams its images: no decoded splits
            from jaxreid.pretrain import pretrain

            results = pretrain(config, workdir, log)
        else:
            run = run_eval if mode == "eval" else train_and_evaluate
            results = run(config, workdir, load_data(config, log), log)
    except TrainingInterrupted as e:
        log(str(e))
        sys.exit(130)
    except KeyboardInterrupt:  # a second SIGINT, or one outside the training loop
        again = " (it resumes from the last checkpoint)" if mode != "eval" else ""
        log(f"interrupted; run the same command again{again}")
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
    if jax.process_index() == 0:
        # An evaluation beside a training run must not overwrite its results.
        path = os.path.join(workdir, "results_eval.json" if mode == "eval" else "results.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        log(f"wrote {path}")


if __name__ == "__main__":
    from jaxreid.command_line import run_with_config

    run_with_config(main)
