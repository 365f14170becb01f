"""``python -m nmsparse`` (and ``torchrun -m nmsparse train ...``)."""

import sys

from .cli.main import main

sys.exit(main())
