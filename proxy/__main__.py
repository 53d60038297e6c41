"""``python -m proxy`` is ``shadow-proxy``."""

import sys

from proxy.cli import main

sys.exit(main())
