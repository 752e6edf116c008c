"""`python app.py [--model M]`: the same as the `mlx-unified-app` command."""

import sys

from mlx_unified.app import main

if __name__ == "__main__":
    sys.exit(main())
