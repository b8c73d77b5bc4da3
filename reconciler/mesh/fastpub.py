"""One NATS publish over a plain socket, standard library only: `notify`'s fast path.

The git hook runs `notify` on every push; starting nats-py and asyncio costs most of a
quarter second, the publish itself well under a millisecond. This speaks the NATS text
protocol directly (INFO, CONNECT, PUB, PING/PONG): user/password, token, nkey seed files
and .creds files (the nonce signed with a small Ed25519 of RFC 8032) and TLS. The PONG
after the PUB means the server has processed it (and refused nothing).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from urllib.parse import unquote, urlsplit

PROTOCOL_TIMEOUT_S = 3.0


class PublishError(Exception):
    """The message did not reach any server (the text names the last server's reason)."""


class Auth:
    """Credentials and TLS files (a plain class: dataclasses costs the hook 15 ms of imports)."""

    def __init__(self, user: str | None = None, password: str | None = None,
                 token: str | None = None, nkey_seed_file: str | None = None,
                 creds_file: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None) -> None:
        self.user, self.password, self.token = user, password, token
        self.nkey_seed_file, self.creds_file = nkey_seed_file, creds_file
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file


def publish(servers: list[str], subject: str, payload: bytes, auth: Auth,
            timeout: float = PROTOCOL_TIMEOUT_S, name: str = "gitops-mesh notify") -> str:
    """Publish to the first server that takes it; returns that server (without credentials)."""
    reason = "no server given"
    for server in servers:
        try:
            _publish_one(server, subject, payload, auth, timeout, name)
            return _redact(server)
        except (OSError, PublishError, ValueError) as exc:  # ssl.SSLError is an OSError
            reason = f"{_redact(server)}: {str(exc) or type(exc).__name__}"
    raise PublishError(reason)


def _publish_one(server: str, subject: str, payload: bytes, auth: Auth, timeout: float,
                 name: str) -> None:
    url = urlsplit(server if "://" in server else f"nats://{server}")
    host, port = url.hostname or "127.0.0.1", url.port or 4222
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        reader = sock.makefile("rb")
        info = _read_info(reader)
        wants_tls = url.scheme == "tls" or bool(auth.ca_file or auth.cert_file)
        if info.get("tls_required") or wants_tls:
            import ssl  # only TLS pays for it (20 ms)

            context = ssl.create_default_context(cafile=auth.ca_file)
            if auth.cert_file:
                context.load_cert_chain(auth.cert_file, auth.key_file)
            sock = context.wrap_socket(sock, server_hostname=host)
            reader = sock.makefile("rb")
        connect = {"verbose": False, "pedantic": False, "lang": "python-stdlib",
                   "version": "1", "protocol": 1, "name": name, "headers": False}
        connect.update(_credentials(url.username, url.password, auth, info.get("nonce")))
        sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\n"
                     + f"PUB {subject} {len(payload)}\r\n".encode() + payload
                     + b"\r\nPING\r\n")
        while True:
            line = reader.readline()
            if not line:
                raise PublishError("the server closed the connection")
            if line.startswith(b"PONG"):
                return
            if line.startswith(b"-ERR"):
                raise PublishError(line[4:].strip().strip(b"'").decode(errors="replace"))
            if line.startswith(b"PING"):
                sock.sendall(b"PONG\r\n")
    finally:
        sock.close()


def _read_info(reader: object) -> dict[str, object]:
    line = reader.readline()  # type: ignore[attr-defined]
    if not line.startswith(b"INFO "):
        raise PublishError("not a NATS server")
    data = json.loads(line[5:])
    return data if isinstance(data, dict) else {}


def _credentials(url_user: str | None, url_password: str | None, auth: Auth,
                 nonce: object) -> dict[str, str]:
    if auth.creds_file:
        jwt, seed = _read_creds(auth.creds_file)
        return {"jwt": jwt, "sig": _sign_nonce(seed, nonce)}
    if auth.nkey_seed_file:
        with open(auth.nkey_seed_file) as f:
            seed = f.read().strip()
        return {"nkey": public_key(seed), "sig": _sign_nonce(seed, nonce)}
    if auth.token:
        return {"auth_token": auth.token}
    user = auth.user or (unquote(url_user) if url_user else None)
    if user:
        password = auth.password if auth.user else unquote(url_password or "")
        return {"user": user, "pass": password or ""}
    if url_user and not url_password:
        return {"auth_token": unquote(url_user)}
    return {}


def _read_creds(path: str) -> tuple[str, str]:
    """(JWT, seed): each is the line after its "-----BEGIN ...-----" marker."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    found: dict[str, str] = {}
    for i, line in enumerate(lines[:-1]):
        if line.startswith("-----BEGIN") and line.endswith("JWT-----"):
            found.setdefault("jwt", lines[i + 1])
        elif line.startswith("-----BEGIN") and "NKEY SEED" in line:
            found.setdefault("seed", lines[i + 1])
    if "jwt" not in found or "seed" not in found:
        raise PublishError(f"{path}: not a .creds file (JWT and seed blocks)")
    return found["jwt"], found["seed"]


def _sign_nonce(seed: str, nonce: object) -> str:
    if not isinstance(nonce, str):
        raise PublishError("the server sent no nonce to sign (is it set up for nkeys?)")
    signature = ed25519_sign(seed_bytes(seed), nonce.encode())
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def _redact(server: str) -> str:
    url = urlsplit(server if "://" in server else f"nats://{server}")
    if url.username or url.password:
        netloc = f"{url.hostname}:{url.port}" if url.port else str(url.hostname)
        return url._replace(netloc=netloc).geturl()
    return server


# ---- nkeys (seed and public key encoding, as github.com/nats-io/nkeys) -------------------------
_PREFIX_SEED = 18 << 3
_PREFIX_USER = 20 << 3


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _b32decode(text: str) -> bytes:
    return base64.b32decode(text + "=" * (-len(text) % 8))


def seed_bytes(seed: str) -> bytes:
    """The 32 Ed25519 seed bytes of a user nkey seed (`SU...`), checksum verified."""
    raw = _b32decode(seed.strip())
    if len(raw) != 36 or raw[0] & 0xF8 != _PREFIX_SEED:
        raise PublishError("not an nkey seed")
    if _crc16(raw[:-2]) != int.from_bytes(raw[-2:], "little"):
        raise PublishError("nkey seed checksum mismatch")
    return raw[2:34]


def public_key(seed: str) -> str:
    """The `U...` public key of a user nkey seed."""
    body = bytes([_PREFIX_USER]) + ed25519_public(seed_bytes(seed))
    body += _crc16(body).to_bytes(2, "little")
    return base64.b32encode(body).decode().rstrip("=")


# ---- Ed25519 signing (RFC 8032, section 6: the reference implementation) -------------------
_P = 2**255 - 19
_Q = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_Point = tuple[int, int, int, int]


def _recover_x(y: int, sign: int) -> int:
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x & 1) != sign:
        x = _P - x
    return x


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
_G: _Point = (_GX, _GY, 1, _GX * _GY % _P)


def _add(a: _Point, b: _Point) -> _Point:
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % _P
    bb = (y1 + x1) * (y2 + x2) % _P
    cc = t1 * 2 * _D * t2 % _P
    dd = z1 * 2 * z2 % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s: int, point: _Point) -> _Point:
    result: _Point = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            result = _add(result, point)
        point = _add(point, point)
        s >>= 1
    return result


def _compress(point: _Point) -> bytes:
    zinv = pow(point[2], _P - 2, _P)
    x, y = point[0] * zinv % _P, point[1] * zinv % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _expand(secret: bytes) -> tuple[int, bytes]:
    h = hashlib.sha512(secret).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


def _hash_mod_q(data: bytes) -> int:
    return int.from_bytes(hashlib.sha512(data).digest(), "little") % _Q


def ed25519_public(secret: bytes) -> bytes:
    return _compress(_mul(_expand(secret)[0], _G))


def ed25519_sign(secret: bytes, message: bytes) -> bytes:
    a, prefix = _expand(secret)
    public = _compress(_mul(a, _G))
    r = _hash_mod_q(prefix + message)
    r_point = _compress(_mul(r, _G))
    s = (r + _hash_mod_q(r_point + public + message) * a) % _Q
    return r_point + s.to_bytes(32, "little")

