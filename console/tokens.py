"""Console tokens and roles: the `--tokens FILE` format and who a bearer token is. Pure.

A token file is YAML or JSON: a list of `{name, token, role}` with role `viewer` (may read
app logs; refused every action) or `operator` (may also act). The name is what the audit
trail records; the token itself is never logged or shown.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from reconciler.core.spec import NAME_RE

Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = ("viewer", "operator")
MIN_TOKEN_CHARS = 12


@dataclass(frozen=True)
class Token:
    name: str
    token: str
    role: Role

    def __repr__(self) -> str:  # never print the secret
        return f"Token(name={self.name!r}, role={self.role!r})"


@dataclass(frozen=True)
class Actor:
    """Who made a request: a token's name and role (or the --insecure anonymous operator)."""

    name: str
    role: Role

    def may(self, role: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def parse_tokens(text: str, where: str = "token file") -> tuple[Token, ...]:
    """Tokens from YAML/JSON text; ValueError naming the entry at fault."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not YAML or JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{where}: expected a list of {{name, token, role}}")
    tokens: list[Token] = []
    for i, entry in enumerate(data, 1):
        at = f"{where}: entry {i}"
        if not isinstance(entry, dict) or set(entry) != {"name", "token", "role"}:
            raise ValueError(f"{at}: expected exactly the keys name, token, role")
        name, token, role = entry["name"], entry["token"], entry["role"]
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"{at}: name {name!r} must be a simple name (letters, digits, -)")
        if role not in ROLES:
            raise ValueError(f"{at} ({name}): role {role!r} must be viewer or operator")
        if not isinstance(token, str) or len(token.strip()) < MIN_TOKEN_CHARS:
            raise ValueError(f"{at} ({name}): token must be at least {MIN_TOKEN_CHARS} "
                             "characters")
        if any(t.name == name for t in tokens):
            raise ValueError(f"{at}: name {name!r} is used twice")
        if any(t.token == token.strip() for t in tokens):
            raise ValueError(f"{at} ({name}): the same token is given twice")
        tokens.append(Token(name, token.strip(), role))
    return tuple(tokens)


def identify(given: str, tokens: tuple[Token, ...]) -> Actor | None:
    """The actor of a bearer token, or None. Every token is compared (constant time each),
    so the time taken does not tell which entry matched."""
    found: Actor | None = None
    for entry in tokens:
        if hmac.compare_digest(given.encode(), entry.token.encode()):
            found = Actor(entry.name, entry.role)
    return found
