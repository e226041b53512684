"""``python -m lotus_kernels`` is the ``lotus`` command."""

import sys

from .recipe.cli import main

sys.exit(main())
