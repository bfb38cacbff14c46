"""``python -m mmtard`` (and ``torchrun -m mmtard``) run the CLI."""

import sys

from mmtard.cli import main

sys.exit(main())
