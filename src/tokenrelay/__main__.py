"""``python -m tokenrelay``: the same as the ``tokenrelay`` command."""

import sys

from tokenrelay.cli.main import main

sys.exit(main())
