"""Entry point: `python -m jaxreid.evaluate --features F.npz [--json]` (see cli.py)."""

import sys

from jaxreid.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
