"""``python -m subspace_jax``: the same as the ``subspace-jax`` command."""

import sys

from subspace_jax.cli import main

sys.exit(main())
