"""``python -m server.cli``: the vitmerge command line."""

import sys

from server.cli import main

sys.exit(main())
