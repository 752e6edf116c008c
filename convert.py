"""Convert Gemma 4 12B unified checkpoints to MLX: `python convert.py --help`."""

import sys

from mlx_unified.convert import main

if __name__ == "__main__":
    sys.exit(main())
