"""The `gitops-mesh` command: parsing and dispatch in `main`, one module per command family."""

from reconciler.cli.main import main

__all__ = ["main"]
