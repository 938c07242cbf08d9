"""``python -m conformance [args]``: the same as ``olmo-attn conformance [args]``."""

import sys

from conformance.cli import main

sys.exit(main(prog="python -m conformance"))
