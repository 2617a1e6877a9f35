"""``python -m zoo``: the ``zoo`` command line (:mod:`zoo.cli`)."""
import sys

from .cli import main

sys.exit(main())
