"""`python -m leafkd`: the leafkd command."""

import sys

from leafkd.cli import main

sys.exit(main())
