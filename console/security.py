"""The console's request guards: tokens and roles, same-origin and CSRF checks, headers."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from console.config import ConsoleConfig
from console.tokens import Actor, Role, identify
from console.web import error_response

CSRF_COOKIE = "gm_csrf"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class SecurityHeaders:
    """Adds CSP and friends to every response (pure ASGI: does not buffer SSE streams)."""

    HEADERS = (
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"x-frame-options", b"DENY"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)



def from_browser(request: Request) -> bool:
    h = request.headers
    return bool(h.get("origin") or h.get("sec-fetch-site") or h.get("cookie"))


def authorize(request: Request, config: ConsoleConfig, need: Role
              ) -> tuple[Actor, None] | tuple[None, Response]:
    """(who, None) when the request may proceed; otherwise (None, the 401/403 saying why).
    Actions (`need` operator, POST) from a browser must also pass the CSRF checks."""
    if need == "operator":
        refused = refuse_cross_site(request, config)
        if refused is not None:
            return None, refused
    if config.insecure:
        return Actor("anonymous", "operator"), None
    tokens = config.all_tokens()
    if not tokens:  # --read-only without tokens: what may be read is open
        if need == "viewer":
            return Actor("anonymous", "viewer"), None
        return None, error_response(403, "this console has no operator token")
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    what = "action token" if need == "operator" else "token"
    if scheme.lower() != "bearer" or not given.strip():
        return None, error_response(401, f"{what} required (Authorization: Bearer <token>)")
    actor = identify(given.strip(), tokens)
    if actor is None:
        return None, error_response(403, f"wrong {what}")
    if not actor.may(need):
        return None, error_response(403, f"token {actor.name!r} is a {actor.role}: this needs an "
                                    f"{need} token")
    return actor, None


def refuse_cross_site(request: Request, config: ConsoleConfig) -> Response | None:
    """None when the request is not a forged cross-site one; otherwise the 403."""
    if config.insecure or from_browser(request):
        site = request.headers.get("sec-fetch-site")
        if site and site not in ("same-origin", "none"):
            return error_response(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin and origin.split("://", 1)[-1] != host:
            return error_response(403, f"cross-origin request refused (Origin: {origin})")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        sent = request.headers.get("x-csrf-token", "")
        if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
            return error_response(403, "missing or wrong CSRF token: reload the page and try again")
    return None

