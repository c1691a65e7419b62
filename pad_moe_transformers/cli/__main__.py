"""`python -m pad_moe_transformers.cli ...` is the same as `pad-moe ...`."""

import sys

from .main import main

sys.exit(main())
