"""Spec loader: YAML text -> validated AppSpecs or located errors (path:line:col). Pure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecFile:
    """One spec file's bytes. `key` identifies the content (a git blob sha) so unchanged files
    are not parsed again between revisions; None means always parse."""

    path: str
    data: bytes
    key: str | None = None
