"""``python -m ddim_jax.convert SRC DST ...``: see :mod:`ddim_jax.convert`."""

import sys

from ddim_jax.convert.cli import main

sys.exit(main())
