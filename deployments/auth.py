"""The optional API key: read once when the router starts (from a file or an environment variable named in
`configs.service.AuthConfig`), then checked on every scoring route as `Authorization: Bearer <key>`.

Health and metadata routes stay open so that load balancers and orchestrators can probe the service.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from configs.service import AuthConfig
from deployments.errors import AuthenticationError

BEARER_PREFIX = "bearer "


def load_api_key(config: AuthConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """The configured key, or None when auth is off; raises ValueError naming the source when it is set
    but gives no key (a service configured for a key never starts open by accident)."""
    if config.api_key_file is not None:
        path = Path(config.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"auth.api_key_file {path} cannot be read: {exc.strerror or exc}") from None
        if not key:
            raise ValueError(f"auth.api_key_file {path} is empty")
        return key
    if config.api_key_env is not None:
        key = environ.get(config.api_key_env, "").strip()
        if not key:
            raise ValueError(f"auth.api_key_env names {config.api_key_env}, which is not set or empty")
        return key
    return None


class ApiKeyCheck:
    """Compares the `Authorization` header with the key in constant time; a None key lets everything in."""

    def __init__(self, api_key: str | None):
        self._key = api_key.encode("utf-8") if api_key is not None else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def check(self, authorization: str | None) -> None:
        """Raises AuthenticationError (401) when a key is required and the header lacks it or differs."""
        if self._key is None:
            return
        if not authorization or not authorization.lower().startswith(BEARER_PREFIX):
            raise AuthenticationError(
                "missing API key: send it as the header `Authorization: Bearer <key>`", param="Authorization"
            )
        given = authorization[len(BEARER_PREFIX):].strip().encode("utf-8")
        if not hmac.compare_digest(given, self._key):
            raise AuthenticationError("invalid API key", param="Authorization")
