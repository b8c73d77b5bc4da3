"""`nats-config`: a least-privilege nats-server auth block and credentials, written offline
(no NATS connection, no nats-py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reconciler.mesh.permissions import NatsConfigError, write_config

EXIT_USAGE = 2


def run_nats_config(args: argparse.Namespace) -> int:
    try:
        written = write_config(Path(args.out), list(args.node or []), auth=args.auth)
    except NatsConfigError as exc:
        print(f"gitops-mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for path in written:
        print(path)
    return 0
