"""``python -m fedrag_jax``: the ``fedrag-jax`` command."""

import sys

from .cli import main

sys.exit(main())
