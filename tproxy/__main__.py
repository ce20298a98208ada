"""``python -m tproxy`` does what the ``tproxy`` command does."""

import sys

from tproxy.cli import main

sys.exit(main())
