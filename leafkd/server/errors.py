"""The server's error answers: every 4xx/5xx the app produces is a JSON ``{"error": ..., "detail": ...}``."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from leafkd.errors import LeafkdError
from leafkd.server.batcher import Overloaded
from leafkd.server.responses import ResponseTooLarge


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one summary line and the list of problems (location, message, type)."""
    detail = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        msg = str(e.get("msg", "invalid"))
        detail.append({"loc": loc, "msg": msg, "type": str(e.get("type", ""))})
    summary = "; ".join(f"{d['loc']}: {d['msg']}" for d in detail[:5])
    return JSONResponse({"error": f"invalid request: {summary}", "detail": detail}, status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404, 405, 401 (with its WWW-Authenticate challenge), ... as JSON."""
    headers = {"WWW-Authenticate": "ApiKey"} if exc.status_code == 401 else getattr(exc, "headers", None)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)


async def user_error(request: Request, exc: LeafkdError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    return JSONResponse({"error": "server overloaded, retry later"}, status_code=503, headers={"Retry-After": "1"})


async def too_large(request: Request, exc: ResponseTooLarge) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=422)


def add_error_handlers(app: FastAPI) -> None:
    app.exception_handler(RequestValidationError)(invalid_request)
    app.exception_handler(StarletteHTTPException)(http_error)
    app.exception_handler(LeafkdError)(user_error)
    app.exception_handler(Overloaded)(overloaded)
    app.exception_handler(ResponseTooLarge)(too_large)
