"""`python -m reconciler` is the `gitops-mesh` command."""

import sys

from reconciler.cli import main

sys.exit(main())
