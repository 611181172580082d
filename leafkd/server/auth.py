"""The server's API key: where it comes from, when serving without one is allowed, and the check on each request.

A key is taken from, in order: ``api_key`` (``--api-key``), ``api_key_file`` (``--api-key-file``), the variable
named by ``api_key_env`` (``--api-key-env``), then ``LEAFKD_API_KEY``. Any of them turns authentication on by
itself. Serving without a key is allowed on a loopback address only, unless explicitly asked for (``--no-auth``).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from leafkd.errors import LeafkdError
from leafkd.server.limits import API_KEY_HEADER

API_KEY_ENV = "LEAFKD_API_KEY"


@dataclass(frozen=True)
class ApiKey:
    """An API key and where it came from (for the start-up line; the key itself is never printed)."""

    value: str
    source: str


def _checked(value: str, source: str) -> ApiKey:
    value = value.strip()
    if not value:
        raise LeafkdError(f"{source}: the API key is empty")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in value):
        raise LeafkdError(f"{source}: the API key must be printable ASCII without spaces (it travels in a header)")
    return ApiKey(value, source)


def resolve_api_key(*, key: str | None = None, key_file: str | Path | None = None, key_env: str | None = None,
                    environ: Mapping[str, str] = os.environ) -> ApiKey | None:
    """The server's API key from the first source given (see the module docstring), or None: no key anywhere."""
    given = [name for name, v in (("--api-key", key), ("--api-key-file", key_file), ("--api-key-env", key_env))
             if v is not None]
    if len(given) > 1:
        raise LeafkdError(f"give one of {' and '.join(given)}, not several")
    if key is not None:
        return _checked(key, "--api-key")
    if key_file is not None:
        path = Path(key_file)
        try:
            return _checked(path.read_text(encoding="utf-8"), f"--api-key-file {path}")
        except (OSError, UnicodeDecodeError) as e:
            raise LeafkdError(f"--api-key-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if key_env is not None:
        if key_env not in environ:
            raise LeafkdError(f"--api-key-env {key_env}: that environment variable is not set")
        return _checked(environ[key_env], f"environment variable {key_env}")
    if API_KEY_ENV in environ:
        return _checked(environ[API_KEY_ENV], f"environment variable {API_KEY_ENV}")
    return None


def is_loopback(address: str) -> bool:
    """Whether a bound address is reachable from this machine only."""
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


def auth_line(key: ApiKey | None, address: str, no_auth: bool) -> str:
    """How the server authenticates, for its start-up line; an error when serving without a key would expose the
    index beyond this machine and ``--no-auth`` was not given (or was given together with a key)."""
    if key is not None:
        if no_auth:
            raise LeafkdError(f"--no-auth, but an API key is set ({key.source}); unset one of them")
        return f"auth on: header {API_KEY_HEADER} must carry the key from {key.source}"
    if no_auth:
        return "auth OFF (--no-auth): anyone who can reach this address can search and embed"
    if not is_loopback(address):
        raise LeafkdError(f"refusing to serve on {address} without an API key: set {API_KEY_ENV} (or --api-key-file), "
                          "or pass --no-auth to serve openly")
    return f"auth off (loopback only; set {API_KEY_ENV} to require a key)"


def api_key_dependencies(api_key: str | None) -> list[Any]:
    """Route dependencies that require the key, in the ``X-API-Key`` header or as ``Authorization: Bearer KEY``
    (what OpenAI clients and Prometheus' ``authorization`` scrape setting send); none without a key."""
    if api_key is None:
        return []
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the server's API key")
    bearer = HTTPBearer(auto_error=False, description="the server's API key as a bearer token")
    want = api_key.encode("utf-8")

    def matches(given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(str(given).encode("utf-8", "replace"), want)

    async def require_key(key: str | None = Depends(key_header),
                          token: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not (matches(key) or (token is not None and matches(token.credentials))):
            raise StarletteHTTPException(401, "missing or wrong API key (header X-API-Key, or Authorization: Bearer)")

    return [Depends(require_key)]
