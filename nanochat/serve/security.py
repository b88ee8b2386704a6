"""The server's guards against callers it should not trust: Bearer API/admin keys (ApiKeyAuth), the Host and
JSON checks that keep web pages out of a server without keys (BrowserGuard), a deadline for a request's headers
and body to arrive (guarded_protocol), refusing an open port beyond loopback (check_exposure), and an OpenAPI
document that lists exactly the errors the server answers. No routes here: app.py wires these around the app."""
import hmac
import ipaddress
import logging

import h11
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.datastructures import Headers
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat.serve.openai_api import error_response

logger = logging.getLogger("nanochat.serve.security")


class _ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None  # OpenAI's error code (model_not_found, context_length_exceeded, invalid_value, ...)


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: OpenAI's error shape."""
    error: _ErrorDetail


_STATUS_WHY = {400: "invalid request (what is wrong is in error.message), or a Host header this server (no API "
                    "key) does not answer to", 401: "missing or wrong API key",
               403: "the admin key is needed", 404: "no such model / adapter / job, or live learning is off",
               405: "method not allowed", 409: "conflicts with an adapter or job", 413: "request body too large",
               415: "a POST that is not JSON, to a server without an API key",
               429: "too many learning jobs queued (see Retry-After)"}
SSE = {"text/event-stream": {"schema": {"description": "server-sent events: one JSON object per data line"}}}


def documented_errors(*codes):
    """OpenAPI `responses` for the error statuses an endpoint can answer (the document lists exactly
    what the server sends: 400 for bad input, never FastAPI's default 422)."""
    return {c: {"model": ErrorBody, "description": _STATUS_WHY[c]} for c in codes}


def without_422(app):
    """Replace app.openapi by one that drops FastAPI's automatic 422 responses: validation errors are
    answered with 400 (on_validation_error), which each route documents itself."""

    def openapi():
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for ops in doc["paths"].values():
                for op in ops.values():
                    op["responses"].pop("422", None)
                    if op.pop("x-sse-only", False):  # FastAPI adds application/json to every 200
                        op["responses"]["200"]["content"].pop("application/json", None)
            for name in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema
    app.openapi = openapi


class ApiKeyAuth:
    """ASGI middleware: Bearer-key checks. With api_key set, every request but PUBLIC needs it (or the
    admin key); admin_key, when set, is the only key for ADMIN requests (training and changing adapters).
    401 when the key is missing or wrong, 403 when the API key is used where the admin key is needed."""
    PUBLIC = {("GET", "/"), ("GET", "/health"), ("HEAD", "/"), ("HEAD", "/health")}

    def __init__(self, app, api_key=None, admin_key=None):
        self.app, self.api_key, self.admin_key = app, api_key or None, admin_key or None

    @staticmethod
    def is_admin(method, path):
        return path == "/learn" or path.startswith("/learn/") or (
            path.startswith("/adapters/") and method in ("POST", "DELETE", "PUT", "PATCH"))

    @staticmethod
    def _matches(given, key):
        return key is not None and hmac.compare_digest(given.encode(), key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (self.api_key is None and self.admin_key is None):
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        auth = Headers(scope=scope).get("authorization", "")
        scheme, _, given = auth.partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        admin = self.is_admin(method, path)
        if admin and self.admin_key is not None:
            if self._matches(given, self.admin_key):
                return await self.app(scope, receive, send)
            if self._matches(given, self.api_key):
                return await error_response(403, f"{method} {path} needs the admin key (--admin-key), not the API "
                                                 "key")(scope, receive, send)
        elif (method, path) in self.PUBLIC or self.api_key is None or \
                self._matches(given, self.api_key) or self._matches(given, self.admin_key):
            return await self.app(scope, receive, send)
        what = "the admin key" if admin and self.admin_key is not None else "the API key"
        message = (f"missing or wrong key: send \"Authorization: Bearer <key>\" with {what} "
                   "(the chat page: enter it under settings)")
        response = error_response(401, message, kind="authentication_error")
        response.headers["WWW-Authenticate"] = "Bearer"
        return await response(scope, receive, send)


def host_name(host_header):
    """A Host header's name, without its port, lower case, without a trailing dot: "[::1]:8000" -> "::1"."""
    host = host_header.strip().lower()
    if host.startswith("["):  # an IPv6 literal
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


class BrowserGuard:
    """ASGI middleware for a server without keys, where any web page its user visits is a possible caller:
    1. the Host header must name this server (a loopback name, or one of allowed_hosts; "*" allows any): a page
       whose DNS name was rebound to 127.0.0.1 sends its own name, and is refused;
    2. a POST must be JSON (Content-Type application/json) or carry an X-Requested-With header: a page can send
       another site a form, text/plain or a body without a type without the browser asking that site first, but
       nothing else, and this server answers no such question (no CORS). Other methods that change things (DELETE)
       always need the browser to ask first."""

    def __init__(self, app, allowed_hosts=()):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {host_name(h) for h in allowed_hosts if h != "*"}  # loopback names pass by is_loopback

    def host_allowed(self, header):
        name = host_name(header)
        return self.any_host or name in self.hosts or is_loopback(name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None and not self.host_allowed(host):
            message = (f"Host {host[:100]!r} is not a name of this server, which has no API key: open it as "
                       "http://127.0.0.1:<port>/ or http://localhost:<port>/, or start it with --allowed-hosts NAME")
            return await error_response(400, message)(scope, receive, send)
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        is_json = kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
        if scope["method"] == "POST" and not is_json and "x-requested-with" not in headers:
            message = (f"a POST to this server (no API key) must be JSON: send \"Content-Type: application/json\" "
                       f"(got {kind or 'none'!r}) or an X-Requested-With header; a web page cannot send either "
                       "to another site unasked")
            return await error_response(415, message)(scope, receive, send)
        return await self.app(scope, receive, send)


def guarded_protocol(request_timeout):
    """uvicorn's h11 protocol, plus a deadline: a request's headers and body must all arrive within
    request_timeout seconds of the connection opening (or of the previous response ending), else the
    connection is closed. uvicorn alone keeps a connection that trickles a byte now and then open forever."""

    class GuardedH11Protocol(H11Protocol):
        _deadline = None

        def _arm(self):
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout, self._expired)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self):
            self._deadline = None
            if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
                logger.info("closing a connection whose request did not arrive within %gs", request_timeout)
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def handle_events(self):
            super().handle_events()
            if self.conn.their_state is h11.DONE:  # the whole request is in
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host, api_key, insecure, allowed_hosts=()):
    """Refuse to serve an unauthenticated API beyond this machine unless asked to: -> a line to print."""
    if api_key:
        if allowed_hosts:
            raise ValueError("--allowed-hosts is for servers without --api-key (a key already keeps web pages out): "
                             "drop one of them")
        return "API key required (Bearer) on every endpoint but /health and the page"
    if is_loopback(host):
        return ("no --api-key: listening on loopback only, so only this machine can reach the server; web pages "
                "cannot reach it through the browser (Host checked, POSTs must be JSON)")
    if not insecure:
        raise ValueError(f"--host {host} without --api-key would let anyone who can reach the port chat, train and "
                         "delete adapters: set --api-key (or NANOCHAT_API_KEY), or pass --insecure to do it anyway")
    return (f"WARNING: --insecure: no API key, listening on {host}: anyone who can reach the port can use everything "
            "(clients must call it by a loopback name, --host, or a name in --allowed-hosts)")
