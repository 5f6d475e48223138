"""YAML as the share holds it: loaded safely, without aliases (which no fedsync file needs and YAML bombs rely
on), dumped in a stable key order."""

from __future__ import annotations

from typing import Any

import yaml

MAX_YAML_BYTES = 1 << 20  # markers are tiny; anything bigger is refused before it is read


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases, which no fedsync file needs and YAML bombs rely on."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed", event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(data: bytes) -> Any:
    return yaml.load(data, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def dump_yaml(obj: Any) -> bytes:
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True).encode()
