"""`python -m mlx_unified.convert`: the same as the `mlx-unified-convert` command."""

import sys

from mlx_unified.convert.command import main

sys.exit(main())
