"""API keys and the admin token of ``meter serve`` (README: HTTP service).

Keys are kept as SHA-256 digests only and compared in constant time (``hmac.compare_digest`` of digests, so
neither a key's content nor its length leaks through timing); none is ever logged, printed or in a ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import List, Optional, Tuple

from starlette.requests import Request

from meterflow.schemas.config import Config

ADMIN = "*"  # the principal of the admin token: every tenant


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Auth:
    """API keys and the admin token, kept as SHA-256 digests only (a configured ``sha256:<hex>`` as given)."""

    def __init__(self, cfg: Config) -> None:
        self._keys: List[Tuple[bytes, str]] = []
        for t in cfg.tenants:
            for k in t.api_keys:
                self._keys.append((bytes.fromhex(k[7:]) if k.startswith("sha256:") else _digest(k), t.id))
        self._admin = _digest(cfg.server.admin_token) if cfg.server.admin_token else None

    def __repr__(self) -> str:
        return f"Auth(<{len(self._keys)} keys>, admin={'set' if self._admin else 'unset'})"

    def principal(self, presented: Optional[str]) -> Optional[str]:
        """The tenant a presented key admits, :data:`ADMIN` for the admin token, None for no or an unknown key.
        Every configured key is compared (no early exit), each in constant time."""
        if not presented:
            return None
        d = _digest(presented)
        found: Optional[str] = None
        for digest, tenant in self._keys:
            if hmac.compare_digest(d, digest) and found is None:
                found = tenant
        if self._admin is not None and hmac.compare_digest(d, self._admin):
            found = ADMIN
        return found

    def is_admin(self, presented: Optional[str]) -> bool:
        return bool(presented) and self._admin is not None and hmac.compare_digest(_digest(presented or ""),
                                                                                  self._admin)


def presented_key(request: Request) -> Optional[str]:
    h = request.headers.get("authorization", "")
    if h[:7].lower() == "bearer ":
        return h[7:].strip()
    return request.headers.get("x-api-key") or None
