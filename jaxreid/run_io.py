"""What a run writes and listens to: the log, metrics (JSON lines and
TensorBoard), and stop requests (SIGINT / SIGTERM)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import jax


def setup_logging(workdir: str, process: int) -> logging.Logger:
    """The "jaxreid" logger: timestamped lines to the console and the workdir's
    log.txt (log.process<N>.txt for process N > 0)."""
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


class MetricWriter:
    """JSON lines always; TensorBoard through clu when its writers import
    (they need TensorFlow, so they stay optional)."""

    def __init__(self, workdir: str):
        # One writer per run: process 0 (the values are replicated).
        self.jsonl = None
        self.clu = None
        if jax.process_index() == 0:
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                # TensorFlow's start-up chatter (TF only writes the summaries).
                os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
                os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
                from clu import metric_writers

                self.clu = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
            except Exception as e:  # noqa: BLE001 -- any import problem means "no TensorBoard"
                logging.warning("TensorBoard summaries off (%s); metrics.jsonl only", e)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.clu is not None:
            self.clu.write_scalars(step, scalars)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.clu is not None:
            self.clu.flush()
            self.clu.close()


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves at the next step and exits."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.requested:  # second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: saving a checkpoint at the next step", file=sys.stderr)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainingInterrupted(Exception):
    pass
