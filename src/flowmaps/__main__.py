"""``python -m flowmaps ...``; also the torchrun entry: ``torchrun --nproc_per_node N -m flowmaps train ...``."""

import sys

from flowmaps.cli import main

sys.exit(main())
