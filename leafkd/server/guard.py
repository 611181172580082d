"""The ASGI guard in front of the app: the request-body limit (counted as bytes arrive, so a chunked body
cannot pass it), security headers on every answer, and a record of each request in `Stats`."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Sequence

from starlette.exceptions import HTTPException as StarletteHTTPException

from leafkd.server.stats import OTHER_ROUTE, Stats

# Sent with every answer: no MIME sniffing of JSON bodies into something a browser would run.
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff")]


class BodyTooLarge(StarletteHTTPException):
    """A request body over the limit. An HTTPException, so FastAPI's body parser lets it through as a 413 (any
    other exception raised while it reads the body becomes a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes", headers={"Connection": "close"})


class Guard:
    """Pure-ASGI middleware (cheaper than BaseHTTPMiddleware): body limit, security headers, request records.

    ``routes`` are the app's paths: any other path is recorded as one ``other`` entry, so unknown paths cannot
    grow `Stats` without bound. The 413 answer closes the connection, so the rest of a huge body is not read.
    """

    def __init__(self, app, stats: Stats, max_body: int, routes: Collection[str],
                 templates: Sequence[tuple[str, re.Pattern]] = ()) -> None:
        self.app = app
        self.stats = stats
        self.max_body = max_body
        self.routes = frozenset(routes)
        self.templates = list(templates)  # (route, its path regex): /documents/{doc_id} is one route

    def route(self, path: str) -> str:
        """The route a path is recorded under: itself, its template, or `OTHER_ROUTE`."""
        if path in self.routes:
            return path
        return next((name for name, regex in self.templates if regex.match(path)), OTHER_ROUTE)

    async def _reject(self, send, path: str, t0: float) -> None:
        body = json.dumps({"error": f"request body over {self.max_body} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body})
        self.stats.record(path, 413, time.perf_counter() - t0)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = self.route(scope.get("path", ""))
        for k, v in scope.get("headers", []):
            if k == b"content-length" and (not v.isdigit() or int(v) > self.max_body):
                await self._reject(send, path, t0)
                return
        seen = 0
        status = [0]

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        async def guarded_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            if status[0]:  # the answer had begun: nothing more can be sent
                self.stats.record(path, status[0], time.perf_counter() - t0)
                raise
            await self._reject(send, path, t0)
            return
        except BaseException:
            self.stats.record(path, status[0] or 500, time.perf_counter() - t0)  # the outer handler answers 500
            raise
        self.stats.record(path, status[0], time.perf_counter() - t0)
