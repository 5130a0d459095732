"""`python -m minrnn.bench [options]`: the same options as `minrnn bench`."""

import sys

from .command import main

sys.exit(main())
