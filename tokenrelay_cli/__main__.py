import sys

from tokenrelay_cli.main import main

sys.exit(main())
