"""`python -m reconciler` is the `gitops-mesh` command."""

import sys

from reconciler.cli.main import main

sys.exit(main())
