"""The one sha256 helper: hex digests of bytes, text or a stream of byte chunks (file contents, record and cache
keys, safe names, list files). Kept apart from every other module so that the lowest ones (`paths`) can use it."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable


def sha256_hex(data: bytes | str | Iterable[bytes], length: int | None = None) -> str:
    """sha256 of `data` as hex, its first `length` digits where given. A str is hashed as UTF-8; an iterable of byte
    chunks is hashed as their concatenation without holding it in memory (files, many arrays)."""
    if isinstance(data, str):
        data = data.encode()
    h = hashlib.sha256()
    for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
        h.update(chunk)
    return h.hexdigest()[:length]
