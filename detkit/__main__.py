"""`python -m detkit <task> [args]`: the same as the `detkit` command (detkit/cli/main.py)."""

import sys

from detkit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
