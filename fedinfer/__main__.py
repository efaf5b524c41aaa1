"""``python -m fedinfer``: the same as the ``fedinfer`` command."""

import sys

from fedinfer.cli import main

sys.exit(main())
