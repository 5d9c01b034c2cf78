"""`python -m diffaug_kernels <command>`: the same as the `diffaug` console script."""
import sys

from .cli import main

sys.exit(main())
