"""Protocol registry: names → Protocol classes, each carrying its version, defaults and presets."""
from __future__ import annotations

from ..registry import did_you_mean
from .base import PROTOCOLS, Context, Protocol, ProtocolError, register_protocol

_LISTING = "ssl-segbench list protocols"


def protocol_class(name: str) -> type[Protocol]:
    """The class registered as `name`; a mistyped name is an error suggesting the close ones."""
    if name not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol '{name}'.{did_you_mean(name, sorted(PROTOCOLS), _LISTING)}")
    return PROTOCOLS[name]


def get_protocol(spec: str, **overrides) -> Protocol:
    """'name' or 'name:preset' → a configured protocol; a mistyped name or preset is an error suggesting the close
    ones."""
    name, _, preset = spec.partition(":")
    cls = protocol_class(name)
    if preset and preset not in cls.presets and preset not in cls.preset_groups:
        raise ProtocolError(f"protocol '{name}' has no preset '{preset}'."
                            f"{did_you_mean(preset, [*cls.presets, *cls.preset_groups], _LISTING)}")
    return cls(preset or None, **overrides)


from . import datus, fs4, kmeans, leopart_cd, linear, maskdistill, overcluster, retrieval  # noqa: E402,F401

__all__ = ["PROTOCOLS", "Context", "Protocol", "ProtocolError", "get_protocol", "protocol_class",
           "register_protocol"]
