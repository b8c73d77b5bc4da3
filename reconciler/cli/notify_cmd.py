"""`gitops-mesh notify` (the git hook's command): one publish, standard library only, no asyncio.

`notify_fast` reads the flags and GITOPS_MESH_* env itself, so the hook skips building the
whole command line parser too (~25 ms); anything unusual (--config, --help, an unknown flag)
goes the normal way through reconciler.cli.main.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

from reconciler.mesh.fastpub import Auth, PublishError, publish
from reconciler.mesh.subjects import SOURCE_CHANGED

EXIT_UNREACHABLE = 2
# flag -> option name, as cli.main defines them for `notify` (add_nats_args)
FLAGS = {f"--{name.replace('_', '-')}": name for name in (
    "repo", "branch", "revision", "nats", "nats_user", "nats_password", "nats_token",
    "nats_nkey", "nats_creds", "nats_ca", "nats_cert", "nats_key", "nats_js_domain")}
REQUIRED = ("repo", "branch", "revision", "nats")


def notify_fast(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int | None:
    """Run `notify ARGV` without the full parser; None: leave it to the full command line."""
    values: dict[str, str | None] = {}
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        name = FLAGS.get(flag)
        if name is None:
            return None
        if not eq:
            given = next(args, None)
            if given is None:
                return None
            value = given
        values[name] = value
    for name in FLAGS.values():
        if values.get(name) is None:
            values[name] = environ.get(f"GITOPS_MESH_{name.upper()}")
    if not all(values.get(name) for name in REQUIRED):
        return None
    return run_notify(SimpleNamespace(**values))


def run_notify(args: Any) -> int:
    """The handler (argparse.Namespace or notify_fast's equivalent)."""
    # the body of mesh.wire.SourceChanged, built here without pydantic
    body = {"repo": args.repo, "branch": args.branch.removeprefix("refs/heads/"),
            "revision": args.revision}
    servers = [s.strip() for s in str(args.nats).split(",") if s.strip()]
    auth = Auth(user=args.nats_user, password=args.nats_password, token=args.nats_token,
                nkey_seed_file=args.nats_nkey, creds_file=args.nats_creds, ca_file=args.nats_ca,
                cert_file=args.nats_cert, key_file=args.nats_key)
    try:
        publish(servers, SOURCE_CHANGED, json.dumps(body).encode(), auth)
    except (PublishError, OSError) as exc:
        print(f"gitops-mesh: cannot connect to NATS at {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return 0
