"""`python -m radial_jax.cli ...`, the same as the `radial-jax` console script."""

import sys

from radial_jax.cli import main

sys.exit(main())
