"""Entry point: `python -m jaxreid.evaluate --features F.npz [--json]` (see cli.py)."""

from jaxreid.command_line import run
from jaxreid.evaluate.cli import main

if __name__ == "__main__":
    run(main)
