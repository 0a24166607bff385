"""``python -m opendelta_dist.estimate``: see :mod:`opendelta_dist.estimate.cli`."""

import sys

from opendelta_dist.estimate.cli import main

sys.exit(main())
