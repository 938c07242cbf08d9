"""``python -m conformance [args]``: the same as ``olmo-attn conformance [args]``."""

import sys

from olmo_attn.cli import conformance_main

sys.exit(conformance_main())
