import sys

from leafkd.cli import main

sys.exit(main())
