#!/usr/bin/env python3
"""Build the example apps' archives deterministically and pin their sha256 in the specs.

    python3 specs-example/build-artifacts.py           # write artifacts/, update the specs
    python3 specs-example/build-artifacts.py --check   # exit 1 if anything is out of date

Each archive is artifacts/<app>-<version>.tar.gz holding <app>-<version>/ with the app's
src/<app>/ files, src/_common/appkit.py and a generated release.json. The same sources always
give the same bytes: sorted entries, fixed mtime/uid/gid/mode, gzip mtime 0 and no name.
Then every `sha256:` that follows a `url: artifacts/<file>` line in apps/ and upgrades/ is
rewritten to the archive's digest, and artifacts/SHA256SUMS lists them all.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MTIME = 1_700_000_000  # fixed: archives must not change when nothing in them did

# app -> version -> extra release.json fields
RELEASES: dict[str, dict[str, dict[str, object]]] = {
    "broker": {"1.0.0": {}},
    "database": {"1.0.0": {}},
    "api": {
        "1.0.0": {"features": ["items"]},
        "1.1.0": {"features": ["items", "version-endpoint"]},
        # a deliberately bad release: its health check fails, so nodes roll back
        "1.2.0": {"features": ["items"], "broken_health": True},
    },
    "worker": {"1.0.0": {}},
    "metrics-agent": {"1.0.0": {}},
    "gateway": {"1.0.0": {}},
}

_URL_SHA = re.compile(
    r"(?P<url>url:\s*[\"']?artifacts/(?P<file>[A-Za-z0-9._-]+\.tar\.gz)[\"']?\s*\n"
    r"(?:[ \t]*#[^\n]*\n)*)(?P<indent>[ \t]*)sha256:\s*[\"']?[0-9a-fA-F]*[\"']?"
)


def archive_bytes(app: str, version: str, extra: dict[str, object]) -> bytes:
    prefix = f"{app}-{version}"
    entries: dict[str, bytes] = {}
    for source in (HERE / "src" / app, HERE / "src" / "_common"):
        for path in sorted(source.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                entries[path.relative_to(source).as_posix()] = path.read_bytes()
    release = {"app": app, "version": version, **extra}
    entries["release.json"] = (json.dumps(release, indent=2, sort_keys=True) + "\n").encode()

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info(prefix + "/", tarfile.DIRTYPE, 0o755, 0))
        for name in sorted(entries):
            data = entries[name]
            mode = 0o755 if name.endswith(".py") and data.startswith(b"#!") else 0o644
            tar.addfile(_info(f"{prefix}/{name}", tarfile.REGTYPE, mode, len(data)),
                        io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _info(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name.rstrip("/") if kind == tarfile.REGTYPE else name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build() -> dict[str, bytes]:
    return {
        f"{app}-{version}.tar.gz": archive_bytes(app, version, extra)
        for app, versions in sorted(RELEASES.items())
        for version, extra in sorted(versions.items())
    }


def pin_specs(text: str, digests: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        digest = digests.get(match["file"])
        if digest is None:
            raise SystemExit(f"a spec names artifacts/{match['file']}, which is not built")
        return f"{match['url']}{match['indent']}sha256: {digest}"

    return _URL_SHA.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report what is out of date")
    args = parser.parse_args(argv)

    archives = build()
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in archives.items()}
    wanted: dict[Path, bytes] = {HERE / "artifacts" / n: d for n, d in archives.items()}
    sums = "".join(f"{digests[n]}  {n}\n" for n in sorted(digests))
    wanted[HERE / "artifacts" / "SHA256SUMS"] = sums.encode()
    for folder in ("apps", "upgrades"):
        for spec in sorted((HERE / folder).glob("*.yaml")):
            wanted[spec] = pin_specs(spec.read_text(), digests).encode()

    stale = [p for p, data in wanted.items() if not p.exists() or p.read_bytes() != data]
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(HERE)}", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(wanted[path])
        print(f"wrote {path.relative_to(HERE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
