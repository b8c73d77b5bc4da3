"""Redaction: what of specs, URLs and probe output may leave a node. Secrets are masked here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from reconciler.core.spec import AppSpec

REDACTED = "***"
# Env values at least this long are masked in probe output (shorter ones are too common:
# masking "1" would mangle every number).
MASK_MIN_LEN = 6
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_url(text: str) -> str:
    """Strip `user:password@` from every URL in `text` (messages, logs, events)."""
    return _USERINFO_RE.sub(r"\g<scheme>", text)


def redact_server(address: str) -> str:
    """A server address without credentials, with or without a scheme (`tok@host:4222`)."""
    if "://" in address:
        return redact_url(address)
    return address.rpartition("@")[2]


def mask_values(text: str, env: Mapping[str, str]) -> str:
    """Mask env values (secrets among them) that a probe's output may echo."""
    for value in sorted(env.values(), key=len, reverse=True):
        if len(value) >= MASK_MIN_LEN:
            text = text.replace(value, REDACTED)
    return text


def redact_spec(spec: AppSpec) -> dict[str, Any]:
    """JSON-ready spec with env values replaced by "***" and URL credentials removed (safe
    to publish)."""
    data = spec.model_dump(mode="json", by_alias=True)
    run = data.get("run")
    if run and run.get("env"):
        run["env"] = {key: REDACTED for key in run["env"]}
    # user:password@ in an archive or probe URL is a secret too
    for holder in (data.get("source"), (data.get("health") or {}).get("http")):
        if isinstance(holder, dict) and isinstance(holder.get("url"), str):
            holder["url"] = redact_url(holder["url"])
    return data
