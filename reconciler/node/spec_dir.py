"""Reading a spec tree from a directory (`validate PATH`, the demo): the loader's file I/O."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.core.loader import MAX_FILE_BYTES, SPEC_SUFFIXES, LoadResult, SpecFile, load_files


def read_directory(
    root: Path, apps_path: str = "apps", max_bytes: int = MAX_FILE_BYTES
) -> list[SpecFile]:
    """Every *.yaml/*.yml below root/apps_path (root itself when apps_path is ""), paths
    relative to root with '/' separators. Hidden folders and symlinked folders are skipped;
    files are read up to max_bytes + 1 so a huge file is refused without reading it all."""
    base = root / apps_path if apps_path else root
    if base.is_file():
        return [_read_one(base, base.name, max_bytes)]
    files: list[SpecFile] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.endswith(SPEC_SUFFIXES) and not filename.startswith("."):
                full = Path(dirpath) / filename
                files.append(_read_one(full, full.relative_to(root).as_posix(), max_bytes))
    return files


def _read_one(full: Path, rel: str, max_bytes: int) -> SpecFile:
    with open(full, "rb") as handle:
        return SpecFile(path=rel, data=handle.read(max_bytes + 1))


def resolve_spec_path(path: Path, apps_path: str | None = None) -> tuple[Path, str]:
    """`validate PATH` accepts a repo root (its apps/ is used), an apps folder or one file:
    -> (root that paths are shown relative to, apps path inside it)."""
    if apps_path is not None:
        return path, apps_path
    if path.is_file():
        return path.parent, path.name
    if (path / "apps").is_dir():
        return path, "apps"
    return path, ""


def load_directory(root: Path, apps_path: str = "apps") -> LoadResult:
    return load_files(read_directory(root, apps_path), apps_path=apps_path or str(root))
