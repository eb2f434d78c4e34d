"""``python -m bus_model.training ...`` is the ``bus`` command (``cli.main``)."""

import sys

from .cli import main

sys.exit(main())
