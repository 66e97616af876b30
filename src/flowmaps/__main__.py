import sys

from flowmaps.cli import main

sys.exit(main())
