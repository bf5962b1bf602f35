"""``python -m devkit.demo``: see ``devkit.demo.run``."""

import sys

from devkit.demo.run import main

sys.exit(main())
