"""``python -m lotus_kernels`` is the ``lotus`` command."""

import sys

from .cli import main

sys.exit(main())
