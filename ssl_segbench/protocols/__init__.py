"""Protocol registry: names → Protocol classes, each carrying its version, typed parameters (`Params`) and presets.

Every module of this package is a protocol (registered with `@register_protocol`) or a helper they share
(SHARED_MODULES); a new protocol is one new file."""
from __future__ import annotations

from ..registry import did_you_mean
from .base import PROTOCOLS, Context, Protocol, ProtocolError, register_protocol

SHARED_MODULES = ("base", "clustering", "training")  # helpers the protocols share; every other module is a protocol


def protocol_class(name: str) -> type[Protocol]:
    """The class registered as `name`; a mistyped name is an error suggesting the close ones."""
    return PROTOCOLS.get(name)


def get_protocol(spec: str, **overrides) -> Protocol:
    """'name' or 'name:preset' → a configured protocol; a mistyped name or preset is an error suggesting the close
    ones."""
    name, _, preset = spec.partition(":")
    cls = protocol_class(name)
    if preset and preset not in cls.presets and preset not in cls.preset_groups:
        raise ProtocolError(f"protocol '{name}' has no preset '{preset}'."
                            f"{did_you_mean(preset, [*cls.presets, *cls.preset_groups], PROTOCOLS.listing)}")
    return cls(preset or None, **overrides)


PROTOCOLS.discover(__name__, shared=SHARED_MODULES)

__all__ = ["PROTOCOLS", "SHARED_MODULES", "Context", "Protocol", "ProtocolError", "get_protocol", "protocol_class",
           "register_protocol"]
