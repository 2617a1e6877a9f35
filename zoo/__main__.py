"""``python -m zoo``: the ``zoo`` command line (:mod:`zoo.cli`)."""
import sys

from zoo.cli import main

sys.exit(main())
