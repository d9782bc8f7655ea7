"""``python -m boshroster`` is the ``boshroster`` command (cli.py patches gevent first)."""

import sys

from boshroster.cli.main import main

sys.exit(main())
