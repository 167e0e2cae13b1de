"""``python -m prunekit.sweep CELL_DIR``: run one sweep cell (what executors start)."""

import sys

from prunekit.sweep import cell_main

sys.exit(cell_main())
