"""YAML as the share holds it: read by the YAML 1.2 core schema (what Go, JavaScript and Rust libraries write:
`5e-05` is a float, `yes` and `2026-12-01` are strings, `012` is twelve), without aliases (which no fedsync file
needs and YAML bombs rely on); dumped in a stable key order, in a form YAML 1.1 and 1.2 readers read alike."""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_YAML_BYTES = 1 << 20  # markers are tiny; anything bigger is refused before it is read


class _Loader(yaml.SafeLoader):
    """safe_load with the YAML 1.2 core schema's plain scalars, and without anchors and aliases."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed", event.start_mark)
        return super().compose_node(parent, index)


def _int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text.startswith(("0o", "0x")) else int(text, 10)


# The core schema's tags for plain scalars (YAML 1.2.2, section 10.3.2), tried in this order; anything else is a string.
for tag, pattern, first in [
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    ("float", r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
     list("-+0123456789.")),
]:
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(f"^(?:{pattern})$"), first)
_Loader.add_constructor("tag:yaml.org,2002:int", _int)


def parse_yaml(data: bytes) -> Any:
    return yaml.load(data, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def dump_yaml(obj: Any) -> bytes:
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True).encode()
