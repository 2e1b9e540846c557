"""``python -m diffcap`` is the ``diffcap`` command (also what ``accelerate launch -m diffcap`` runs)."""

import sys

from .cli import main

sys.exit(main())
