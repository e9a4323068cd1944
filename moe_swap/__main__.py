"""``python -m moe_swap demo|bench|info`` (see moe_swap/cli.py)."""

import sys

from .cli import main

sys.exit(main())
