"""Protocol registry: names → Protocol classes, each carrying its version, defaults and presets."""
from __future__ import annotations

from .base import Context, Protocol, ProtocolError

PROTOCOLS: dict[str, type[Protocol]] = {}


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    if not cls.name or cls.name in PROTOCOLS:
        raise ValueError(f"protocol name {cls.name!r} is empty or registered twice")
    PROTOCOLS[cls.name] = cls
    return cls


def get_protocol(spec: str, **overrides) -> Protocol:
    """'name' or 'name:preset' → a configured protocol."""
    name, _, preset = spec.partition(":")
    if name not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol '{name}'. Known: {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name](preset or None, **overrides)


from . import datus, fs4, kmeans, leopart_cd, linear, maskdistill, overcluster, retrieval  # noqa: E402,F401

__all__ = ["PROTOCOLS", "Context", "Protocol", "ProtocolError", "get_protocol", "register_protocol"]
