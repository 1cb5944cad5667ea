"""The served dashboard refuses requests for other hosts and pages of other origins (DNS rebinding).

A page on ``http://evil.example`` whose name an attacker re-points at 127.0.0.1 is, to the browser,
same-origin with ``http://evil.example:8501``: it can read the dashboard over HTTP and open its
WebSocket, unless the server checks the names. Streamlit's ``server.allowedHosts`` option checks the
Host of the WebSocket only (and accepts any Host while the list is empty); :class:`HostGuard`, an
ASGI middleware that ``lfp serve`` installs (lfp_serve.py, an ``st.App`` around app.py), checks every
HTTP request and WebSocket upgrade:

* the ``Host`` header's name must be in ``server.allowedHosts`` (.streamlit/config.toml lists the
  loopback names; ``*.example.com`` and ``*`` work as in Streamlit; an empty list means the loopback
  names), ports ignored;
* an ``Origin`` header, when sent (every WebSocket from a browser, every cross-origin request), must
  be the request's own origin (scheme-less: its host and port equal to ``Host``) or be listed in
  ``server.corsAllowedOrigins``; ``Origin: null`` (sandboxed frames, files) is refused.

A refused HTTP request gets 403 and a one-line text; a refused WebSocket is closed before it is
accepted, which the server answers with 403. Neither echoes the request's values.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
REFUSED = (
    b"403 Forbidden: this dashboard answers only the host names in server.allowedHosts "
    b"(.streamlit/config.toml), from its own pages.\n"
)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def host_name(host: str | None) -> str | None:
    """The name in a ``Host`` header (``127.0.0.1:8501`` -> ``127.0.0.1``, ``[::1]:80`` -> ``::1``),
    lower-cased without a trailing dot; None when the header is missing or not a bare host[:port]."""
    if not host:
        return None
    try:
        parts = urlsplit(f"//{host}")
        _ = parts.port  # a port that is not a number in range raises
    except ValueError:
        return None
    if not parts.hostname or parts.username or parts.password or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname.lower().rstrip(".")


def host_allowed(host: str | None, allowed: Iterable[str]) -> bool:
    """Whether ``host`` (a Host header) names one of ``allowed`` (names, ``*.domain``, or ``*``)."""
    name = host_name(host)
    if name is None:
        return False
    for pattern in allowed:
        p = pattern.strip().lower().rstrip(".")
        if p == "*" or name == p or (p.startswith("*.") and name.endswith(p[1:])):
            return True
    return False


def origin_allowed(origin: str, host: str | None, cors_origins: Iterable[str]) -> bool:
    """Whether a request from page origin ``origin`` may reach the server addressed as ``host``: its
    own origin (same host and port as the Host header) or one listed in ``cors_origins``."""
    if origin.strip().rstrip("/") in {o.strip().rstrip("/") for o in cors_origins}:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
        return False
    return parts.netloc.lower() == host.strip().lower()


def configured_hosts() -> list[str]:
    """``server.allowedHosts`` from Streamlit's config, or the loopback names when it is empty."""
    from streamlit import config

    hosts = [h for h in config.get_option("server.allowedHosts") or [] if h.strip()]
    return hosts or list(LOOPBACK_HOSTS)


def configured_origins() -> list[str]:
    from streamlit import config

    return list(config.get_option("server.corsAllowedOrigins") or [])


class HostGuard:
    """ASGI middleware: refuse HTTP requests and WebSocket upgrades whose Host is not allowed or whose
    Origin is another site's (see the module's docstring). ``hosts``/``origins`` default to Streamlit's
    ``server.allowedHosts``/``server.corsAllowedOrigins``, read on every request."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], hosts=None, origins=None):
        self.app, self.hosts, self.origins = app, hosts, origins

    def allows(self, headers: dict[str, str]) -> bool:
        host = headers.get("host")
        if not host_allowed(host, self.hosts if self.hosts is not None else configured_hosts()):
            return False
        origin = headers.get("origin")
        if origin is None:  # a navigation or a same-origin GET: browsers send no Origin
            return True
        return origin_allowed(origin, host, self.origins if self.origins is not None else configured_origins())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        if self.allows(headers):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", b"%d" % len(REFUSED)),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": REFUSED})
        else:
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})  # before accept: the server answers 403
