"""The server's error answers: every 4xx/5xx the app produces is a JSON ``{"error": ..., "detail": ...}``."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from leafkd.errors import LeafkdError
from leafkd.retrieval.backend import DocumentError, DuplicateIdError, UnknownIdError
from leafkd.retrieval.filters import FilterError
from leafkd.retrieval.manifest import IndexBusyError
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


async def document_error(request: Request, exc: DocumentError) -> JSONResponse:
    """Ids already there (409), ids not there (404), documents the index cannot take (422)."""
    if isinstance(exc, (DuplicateIdError, UnknownIdError)):
        status = 409 if isinstance(exc, DuplicateIdError) else 404
        return JSONResponse({"error": str(exc), "detail": {"ids": exc.ids[:1000]}}, status_code=status)
    return JSONResponse({"error": str(exc)}, status_code=422)


async def invalid_filter(request: Request, exc: FilterError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=422)


async def index_busy(request: Request, exc: IndexBusyError) -> JSONResponse:
    """Another process is updating the index: retry shortly."""
    return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})


async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    return JSONResponse({"error": "server overloaded, retry later"}, status_code=503, headers={"Retry-After": "1"})


async def too_large(request: Request, exc: ResponseTooLarge) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=422)


def add_error_handlers(app: FastAPI) -> None:
    app.exception_handler(RequestValidationError)(invalid_request)
    app.exception_handler(StarletteHTTPException)(http_error)
    app.exception_handler(LeafkdError)(user_error)
    app.exception_handler(DocumentError)(document_error)
    app.exception_handler(FilterError)(invalid_filter)
    app.exception_handler(IndexBusyError)(index_busy)
    app.exception_handler(Overloaded)(overloaded)
    app.exception_handler(ResponseTooLarge)(too_large)
