"""`python -m minrnn.bench [options]` is `minrnn bench [options]`."""

import sys

from ..cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
