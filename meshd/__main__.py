"""`python -m meshd ...` is the `meshd` command (the tests and the demo start daemons this way)."""

import sys

from .cmd.meshd import meshd_main

sys.exit(meshd_main())
