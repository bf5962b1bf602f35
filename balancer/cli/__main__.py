"""``python -m balancer.cli``: the same as the ``llmlb`` command."""

import sys

from balancer.cli.main import main

sys.exit(main())
