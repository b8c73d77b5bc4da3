"""KEY=VALUE text (env files of apps, credential files of nats-config): one parser. Pure."""

from __future__ import annotations


def parse_env(text: str, where: str) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped, optional `export `, quotes
    stripped). Raises ValueError naming `where` and the line, never a value."""
    env: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        if "\x00" in line:
            raise ValueError(f"{where}:{lineno}: NUL byte")
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ValueError(f"{where}:{lineno}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key] = value
    return env
