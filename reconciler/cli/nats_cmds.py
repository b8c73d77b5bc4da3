"""`gitops-mesh nats-init`: create or verify the events stream and the buckets (admin identity)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from nats.aio.client import Client as NATS

from reconciler.mesh.client import TRANSIENT, no_jetstream_here
from reconciler.mesh.conn import MeshError, NatsOptions, connect, no_jetstream, reason_of
from reconciler.mesh.provision import Finding, provision, updatable

EXIT_OK, EXIT_DIFFERS, EXIT_UNREACHABLE = 0, 1, 2
CLUSTER_REPLICAS = 3


def cluster_size(nc: NATS) -> int:
    """Servers of the cluster `nc` is connected to, from the server's INFO (connect_urls
    lists every member's client URL; a single server sends none)."""
    info: dict[str, Any] = getattr(nc, "_server_info", {}) or {}
    urls = set(info.get("connect_urls") or [])
    return max(1, len(urls))


def default_replicas(nc: NATS) -> int:
    return CLUSTER_REPLICAS if cluster_size(nc) >= CLUSTER_REPLICAS else 1


def report(findings: list[Finding], replicas: int) -> int:
    """Print one line per stream/bucket; exit 1 if anything still differs."""
    for finding in findings:
        print(finding.describe())
    left = [f for f in findings if f.state == "differs"]
    for finding in left:
        how = ("re-run with --update to change it in place" if updatable(finding.problems)
               else "JetStream cannot change this in place: move the data away, delete it, "
                    "and run nats-init again")
        print(f"gitops-mesh: {finding.wanted.label}: not changed ({how})", file=sys.stderr)
    if not left:
        print(f"ok: {len(findings)} streams/buckets as documented ({replicas} replica(s))")
    return EXIT_DIFFERS if left else EXIT_OK


async def _init(args: argparse.Namespace) -> int:
    options = NatsOptions.from_args(args)
    options.name = "gitops-mesh nats-init"
    nc = await connect(options)
    try:
        replicas = args.replicas or default_replicas(nc)
        js = options.jetstream(nc)
        try:
            findings = await provision(js, replicas, update=bool(args.update))
        except TRANSIENT as exc:
            if no_jetstream_here(exc):
                raise MeshError(no_jetstream(options.js_domain)) from None
            raise MeshError(f"JetStream at {options.describe()}: {reason_of(exc)} (is this "
                            "identity allowed to manage streams? nats-config's admin is)"
                            ) from None
        return report(findings, replicas)
    finally:
        await nc.close()


def run_nats_init(args: argparse.Namespace) -> int:
    if args.replicas is not None and not 1 <= args.replicas <= 5:
        print("gitops-mesh: --replicas: 1 to 5 (JetStream's limit)", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        return asyncio.run(_init(args))
    except MeshError as exc:
        print(f"gitops-mesh: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
