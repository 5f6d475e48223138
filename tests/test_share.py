"""The share's primitives: whole-file writes, safe YAML, name rules and strict markers."""

import errno
import os
from pathlib import Path

import pytest
import yaml

from fedsync.base.errors import ShareError
from fedsync.storage import local
from fedsync.storage.local import atomic_write
from fedsync.storage.markers import (
    FORMAT_VERSION,
    FileRef,
    FormatMismatch,
    MarkerError,
    PathOutsideFolder,
    UpdateMarker,
    parse,
    to_dict,
)
from fedsync.storage.names import check_worker_name, is_conflict_copy, is_temporary
from fedsync.storage.share import Share
from fedsync.storage.store import OversizeError

HASH = "ab" * 32


def _marker(**changes: object) -> dict:
    m = to_dict(UpdateMarker(format=FORMAT_VERSION, round=2, worker="w1", base=HASH,
                             tensors=FileRef("w1.safetensors", HASH, 10), samples=5, steps=2, train_loss=0.5,
                             seconds=1.0, device="cpu"))
    m.update(changes)
    return m


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "f.yaml"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.yaml"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    with pytest.raises(TypeError):
        atomic_write(target, object())  # type: ignore[arg-type]  # write() refuses: nothing may be left behind
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_reader_name_rules() -> None:
    assert is_temporary(".w1.yaml.abc.tmp") and is_temporary(".syncthing.w1.yaml.tmp")
    assert is_temporary("~syncthing~w1.yaml.tmp") and not is_temporary("w1.yaml")
    assert is_conflict_copy("w1.sync-conflict-20261123-101010-ABCDEFG.yaml")
    assert check_worker_name("gpu-box_2.local") == "gpu-box_2.local"
    for bad in ("../x", "", ".hidden", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            check_worker_name(bad)
    for number in ("1e5", "0x10", "012", "yes", "null", "2026-11-23"):  # a name every YAML reader reads as a name
        with pytest.raises(ValueError, match=f"worker name '{number}' is not allowed: YAML reads it as a number"):
            check_worker_name(number)
    assert check_worker_name("w-1e5") == "w-1e5"


@pytest.mark.parametrize("url", ["https://host/share", "ftp://host/share", "webdav://host/x"])
def test_a_url_of_no_object_store_is_refused_and_a_drive_letter_is_a_folder(url: str) -> None:
    with pytest.raises(ShareError, match=f"share {url}: fedsync reads shares from s3://, gs://, az://"):
        Share.parse(url)
    assert Share.parse("C:/fed").root == Path("C:/fed")  # a Windows drive, or a folder named C: here


def test_an_object_store_url_survives_the_command_line() -> None:
    share = Share.parse("s3://bucket/runs/one")  # what the command line's --share parser makes of it
    assert share.root == "s3://bucket/runs/one" and share.store.local_folder is None
    assert share.where("fedsync.yaml") == "s3://bucket/runs/one/fedsync.yaml"
    assert share.identity == "s3://bucket/runs/one"
    with pytest.raises(ShareError, match="is an object store: its files have no local path"):
        share.path("fedsync.yaml")


def test_share_layout_names() -> None:
    s = Share(Path("/mnt/fed"))
    assert s.update_marker(3, "w1") == "0003/updates/w1.yaml"
    assert s.path(s.update_marker(3, "w1")) == Path("/mnt/fed/0003/updates/w1.yaml")
    assert s.model_after(3, 20) == "0004/global.safetensors"
    assert s.model_after(20, 20) == "final.safetensors"


def test_read_yaml_refuses_oversize_and_aliases(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a: " + b"x" * 2000)
    share = Share(tmp_path)
    with pytest.raises(OversizeError):
        share.read_yaml("big.yaml", limit=1000)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["lol","lol"]\nb: &b [*a,*a,*a]\nc: &c [*b,*b,*b]\n')
    with pytest.raises(yaml.YAMLError, match="aliases"):
        share.read_yaml(bomb.name)
    assert share.read_yaml("big.yaml", limit=4096) == {"a": "x" * 2000}


def test_marker_round_trip_and_strict_types() -> None:
    assert parse(UpdateMarker, _marker(), "m").samples == 5
    with pytest.raises(MarkerError, match="missing field 'samples'"):
        m = _marker()
        del m["samples"]
        parse(UpdateMarker, m, "m")
    with pytest.raises(MarkerError, match="samples"):
        parse(UpdateMarker, _marker(samples=True), "m")  # a bool is not a count
    with pytest.raises(MarkerError, match="train_loss"):
        parse(UpdateMarker, _marker(train_loss=float("nan")), "m")
    with pytest.raises(MarkerError, match="blake3"):
        parse(UpdateMarker, _marker(tensors={"file": "w1.safetensors", "blake3": "xyz", "bytes": 1}), "m")


@pytest.mark.parametrize("path", ["../w1.safetensors", "/etc/passwd", "a/../../b", ".hidden", "C:\\x"])
def test_marker_paths_stay_inside(path: str) -> None:
    with pytest.raises(PathOutsideFolder):
        parse(UpdateMarker, _marker(tensors={"file": path, "blake3": HASH, "bytes": 1}), "m")


def test_newer_and_older_formats_are_different_errors() -> None:
    with pytest.raises(FormatMismatch, match="newer fedsync"):
        parse(UpdateMarker, _marker(format=FORMAT_VERSION + 1), "m")
    with pytest.raises(FormatMismatch, match="older share format"):
        parse(UpdateMarker, _marker(format=0), "m")


def test_a_temporary_the_share_refused_to_delete_is_deleted_after_the_next_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails once its temporary exists (the share turned read-only under it) cannot delete the temporary
    either; the process deletes it after its next successful write, so a live writer leaves no junk."""
    real_replace, real_unlink = os.replace, os.unlink

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", refused)
    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(OSError):
        local.atomic_write(tmp_path / "metrics.csv", b"round\n1\n")
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".metrics.csv.") and left[0].endswith(".tmp")
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(os, "unlink", real_unlink)
    local.atomic_write(tmp_path / "metrics.csv", b"round\n1\n2\n")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"] and not local.ORPHANS.paths


def test_a_file_written_while_the_share_goes_away_is_not_left_in_the_bare_mount_point(tmp_path: Path) -> None:
    """The share is unmounted between the check before a write and the write itself: the file lands in the bare
    folder, is found there by the check after, removed, and the write fails as share trouble (retried later)."""
    root = tmp_path / "share"
    Share(root).start({"format": 2})

    class Unmounting(local.LocalStore):
        def write(self, name: str, data: bytes) -> None:
            os.rename(root, tmp_path / "elsewhere")  # the mount goes: the mount point is a bare folder again
            root.mkdir()
            super().write(name, data)

    share = Share(root, Unmounting(root))
    with pytest.raises(FileNotFoundError) as caught:
        share.write("metrics.csv", b"round\n")
    assert caught.value.errno == errno.ENOENT and list(root.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["fedsync.yaml"]
