"""The share's YAML is read by the YAML 1.2 core schema, as other languages' libraries write it."""

from __future__ import annotations

import math

import pytest

from fedsync.storage.markers import MarkerError, UpdateMarker, parse
from fedsync.storage.yamlfile import dump_yaml, parse_yaml


def test_plain_scalars_follow_the_yaml_1_2_core_schema() -> None:
    doc = parse_yaml(b"a: 5e-05\nb: 1E3\nc: 012\nd: yes\ne: 0x1F\nf: .inf\ng: ~\nh: 2026-11-23\ni: -.5\nj: 0o17\n"
                     b"k: True\nl:\nm: 1_000\nn: +12\no: .NaN\np: on\nq: 1.\n")
    nan = doc.pop("o")
    assert math.isnan(nan)
    assert doc == {"a": 5e-05, "b": 1000.0, "c": 12, "d": "yes", "e": 31, "f": math.inf, "g": None,
                   "h": "2026-11-23", "i": -0.5, "j": 15, "k": True, "l": None, "m": "1_000", "n": 12, "p": "on",
                   "q": 1.0}
    assert isinstance(doc["b"], float) and isinstance(doc["c"], int)


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
