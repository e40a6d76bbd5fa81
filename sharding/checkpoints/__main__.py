"""`python -m sharding.checkpoints inspect|convert ...` (see `sharding.checkpoints.cli`)."""

import sys

from sharding.checkpoints.cli import main

sys.exit(main())
