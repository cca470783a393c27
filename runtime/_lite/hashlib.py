"""SHA-256 for the start path (cache keys, tenant id ranges).

`hashlib` loads OpenSSL's libcrypto on import (a cost on every container start); CPython's
own `_sha256` module gives the same digests. Falls back to hashlib where `_sha256` is absent
(Python 3.12 renamed it `_sha2`).
"""

from __future__ import annotations

try:
    from _sha256 import sha256
except ImportError:  # pragma: no cover - other CPython versions
    try:
        from _sha2 import sha256  # type: ignore[no-redef]
    except ImportError:
        from hashlib import sha256  # type: ignore[no-redef]

__all__ = ["sha256"]
