"""`python -m minrnn ...` is the `minrnn` command."""

import sys

from .cli import main

sys.exit(main())
