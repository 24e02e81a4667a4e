"""YAML read strictly: safe types only and no duplicate keys (PyYAML keeps the last of two equal keys silently, which
would let a typo in backbones.yaml or a classes file override a value without a word)."""
from __future__ import annotations

import yaml

from .errors import SegbenchError


class YAMLError(SegbenchError):
    """A YAML file that does not parse, or has a key twice; the message names the file and the line."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load(text: str, source: str = "<string>"):
    """Parse YAML text; `source` names the file in errors."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise YAMLError(f"{source} is not valid YAML: {e}") from None
