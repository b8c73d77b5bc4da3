"""The `gitops-mesh` command: parsing and dispatch in `main`, one module per command family."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from reconciler.cli.notify_cmd import notify_fast


def main(argv: Sequence[str] | None = None) -> int:
    """`gitops-mesh ARGS`. `notify` runs in a git hook on every push: it skips the full
    parser when it can (reconciler.cli.notify_cmd); everything else is reconciler.cli.main,
    imported only then (its parser, logging and YAML would cost the hook its budget)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["notify"]:
        code = notify_fast(args[1:])
        if code is not None:
            return code
    from reconciler.cli.main import main as full_main

    return full_main(args)


__all__ = ["main"]
