"""`python generate.py --model M --prompt "..."`: the same as the `mlx-unified-generate` command."""

import sys

from mlx_unified.cli import main

if __name__ == "__main__":
    sys.exit(main())
