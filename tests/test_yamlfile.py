"""The share's YAML is read by the YAML 1.2 core schema, as other languages' libraries write it."""

from __future__ import annotations

import math

import pytest
import yaml

from fedsync.storage import yamlfile
from fedsync.storage.markers import MarkerError, UpdateMarker, parse
from fedsync.storage.yamlfile import dump_yaml, parse_yaml, reads_as_string

# libyaml's parser where PyYAML has it (as in every wheel), PyYAML's Python one otherwise: both must read alike
LOADERS = [yamlfile._Loader, yamlfile._PythonLoader]


def test_the_fast_parser_is_the_one_in_use() -> None:
    assert yamlfile._Parser is not None and yamlfile._Loader is not yamlfile._PythonLoader


@pytest.mark.parametrize("loader", LOADERS, ids=["libyaml", "python"])
def test_plain_scalars_follow_the_yaml_1_2_core_schema(loader: type) -> None:
    doc = parse_yaml(b"a: 5e-05\nb: 1E3\nc: 012\nd: yes\ne: 0x1F\nf: .inf\ng: ~\nh: 2026-11-23\ni: -.5\nj: 0o17\n"
                     b"k: True\nl:\nm: 1_000\nn: +12\no: .NaN\np: on\nq: 1.\nr: '5'\ns: !!int '7'\n", loader)
    nan = doc.pop("o")
    assert math.isnan(nan)
    assert doc == {"a": 5e-05, "b": 1000.0, "c": 12, "d": "yes", "e": 31, "f": math.inf, "g": None,
                   "h": "2026-11-23", "i": -0.5, "j": 15, "k": True, "l": None, "m": "1_000", "n": 12, "p": "on",
                   "q": 1.0, "r": "5", "s": 7}
    assert isinstance(doc["b"], float) and isinstance(doc["c"], int)


@pytest.mark.parametrize("loader", LOADERS, ids=["libyaml", "python"])
@pytest.mark.parametrize("doc", [b"a: &x 1\nb: *x\n", b"a: &a [x,x]\nb: &b [*a,*a]\nc: [*b,*b]\n", b"r: &r [*r]\n",
                                 b"- &m {k: 1}\n- *m\n"])
def test_aliases_are_refused_before_anything_is_expanded(loader: type, doc: bytes) -> None:
    with pytest.raises(yaml.YAMLError, match="alias"):
        parse_yaml(doc, loader)


@pytest.mark.parametrize("loader", LOADERS, ids=["libyaml", "python"])
def test_an_anchor_alone_empty_and_many_documents(loader: type) -> None:
    assert parse_yaml(b"a: &x [1]\n", loader) == {"a": [1]}  # an anchor nothing refers to is harmless
    assert parse_yaml(b"", loader) is None
    with pytest.raises(yaml.YAMLError, match="single document"):
        parse_yaml(b"x: 1\n--- \ny: 2\n", loader)


def test_libyaml_writes_what_python_writes() -> None:
    doc = {"a": 1e-05, "b": math.inf, "c": "yes", "d": None, "e": [1, {"x": "é—ü"}], "f": "multi\nline", "g": "012",
           "h": {}, "i": [], "j": "a: b"}
    assert dump_yaml(doc) == yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()


def test_what_fedsync_writes_reads_back_the_same() -> None:
    values = {"small": 5e-05, "big": 1e300, "neg": -0.0, "text": "yes", "date": "2026-11-23", "int": 12, "none": None}
    assert parse_yaml(dump_yaml(values)) == values


def test_a_marker_written_as_go_or_javascript_writes_it_is_read_and_non_finite_stays_refused() -> None:
    marker = (b"format: 2\nround: 1\nworker: w\nbase: " + b"ab" * 32 + b"\ntensors: null\nsamples: 10\nsteps: 1\n"
              b"train_loss: 5e-05\nseconds: 1E-1\ndevice: cpu\ndiverged: loss\n")
    m = parse(UpdateMarker, parse_yaml(marker), "m")
    assert m.train_loss == 5e-05 and m.seconds == 0.1
    with pytest.raises(MarkerError, match="seconds"):
        parse(UpdateMarker, parse_yaml(marker.replace(b"seconds: 1E-1", b"seconds: .inf")), "m")


@pytest.mark.parametrize("text", ["1e5", "1E5", "0x1F", "0o17", "+12", ".5", "012", "1_000", "yes", "no", "on", "off",
                                  "null", "~", "true", "2026-11-23", ".inf", ".nan"])
def test_a_string_either_schema_reads_as_another_type_is_quoted_and_read_back_as_written(text: str) -> None:
    """A worker named 1e5 was written plain and read back as 100000.0 (YAML 1.2), yes as True (YAML 1.1)."""
    data = dump_yaml({"worker": text})
    assert data == f"worker: '{text}'\n".encode()
    assert parse_yaml(data) == {"worker": text} and yaml.safe_load(data) == {"worker": text}
    assert not reads_as_string(text)


@pytest.mark.parametrize("text", ["w1", "box-2", "1.2.3", "inf", "NaN", "e5", "1e", "gpu.local"])
def test_a_plain_string_stays_plain(text: str) -> None:
    assert dump_yaml({"worker": text}) == f"worker: {text}\n".encode() and reads_as_string(text)
