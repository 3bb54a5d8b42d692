"""``python -m benchmarks`` (from the repository root): see benchmarks/run.py."""

import sys

from .run import main

sys.exit(main())
