"""YAML as the share holds it: read by the YAML 1.2 core schema (what Go, JavaScript and Rust libraries write:
`5e-05` is a float, `yes` and `2026-12-01` are strings, `012` is twelve), without aliases (which no fedsync file
needs and YAML bombs rely on); dumped in a stable key order, in a form YAML 1.1 and 1.2 readers read alike (a
string that either would read as another type is quoted)."""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_YAML_BYTES = 1 << 20  # markers are tiny; anything bigger is refused before it is read


class _Resolver(yaml.resolver.BaseResolver):
    """The YAML 1.2 core schema's plain scalars (below) instead of YAML 1.1's."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}


def _int(loader: yaml.constructor.SafeConstructor, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text.startswith(("0o", "0x")) else int(text, 10)


# The core schema's tags for plain scalars (YAML 1.2.2, section 10.3.2), tried in this order; anything else is a string.
CORE_SCALARS = [
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    ("float", r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
     list("-+0123456789.")),
]


class _EitherSchema(yaml.resolver.Resolver):
    """YAML 1.1's implicit types and the 1.2 core schema's together: what decides whether a string is written plain
    (only when neither would read it as something else: `1e5` is a float to a YAML 1.2 reader, `yes` a bool to a
    1.1 one; both are quoted)."""


for tag, pattern, first in CORE_SCALARS:
    _Resolver.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(f"^(?:{pattern})$"), first)
    _EitherSchema.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(f"^(?:{pattern})$"), first)
_EITHER = _EitherSchema()

# libyaml's parser (in PyYAML's wheels) reads a file about ten times faster than PyYAML's Python one: a coordinator
# of 1,000 workers reads every registration at each heartbeat. The two read alike (tests/test_yamlfile.py runs both).
try:
    from yaml._yaml import CParser as _Parser
except ImportError:  # a PyYAML built without libyaml
    _Parser = None  # type: ignore[assignment,misc]


def _refuse_aliases(node: yaml.Node) -> None:
    """An alias makes one node appear twice in the tree (YAML bombs rely on it): refused, before any is expanded."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed", n.start_mark)
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            stack.extend(x for pair in n.value for x in pair)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


class _PythonLoader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer,
                    yaml.constructor.SafeConstructor, _Resolver):
    """safe_load's parts with the core schema; used only where PyYAML lacks libyaml."""

    def __init__(self, stream: bytes) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _Resolver.__init__(self)


if _Parser is not None:
    class _Loader(_Parser, yaml.constructor.SafeConstructor, _Resolver):  # type: ignore[misc,valid-type]
        """safe_load with libyaml's parser and the core schema."""

        def __init__(self, stream: bytes) -> None:
            _Parser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            _Resolver.__init__(self)
else:
    _Loader = _PythonLoader  # type: ignore[misc]

for _cls in {_Loader, _PythonLoader}:
    _cls.add_constructor("tag:yaml.org,2002:int", _int)


def parse_yaml(data: bytes, loader: type = _Loader) -> Any:
    """The document, safe types only, no aliases; `loader` is for tests that hold the two parsers to one reading."""
    parser = loader(data)
    try:
        node = parser.get_single_node()
        if node is None:
            return None
        _refuse_aliases(node)
        return parser.construct_document(node)
    finally:
        parser.dispose()


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """libyaml's emitter (the same bytes as PyYAML's, 4x faster), quoting by both schemas."""

    yaml_implicit_resolvers = _EitherSchema.yaml_implicit_resolvers


def dump_yaml(obj: Any) -> bytes:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, allow_unicode=True).encode()


def reads_as_string(text: str) -> bool:
    """Whether every YAML reader, 1.1 or 1.2, reads `text` written plain as this string (names must: another
    implementation may write them unquoted)."""
    return _EITHER.resolve(yaml.ScalarNode, text, (True, False)) == "tag:yaml.org,2002:str"
