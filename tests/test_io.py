"""dwp.io: atomic writes, torch files read with errors that name them, versioned formats."""

import os
import stat

import pytest
import torch

import dwp
from dwp.io import (
    FileFormat,
    LibraryFileError,
    atomic_write,
    check_plain,
    load_torch_file,
    save_torch_file,
    write_json,
    write_text,
)


class ThingError(LibraryFileError):
    pass


THING = FileFormat(tag="test.Thing", version=2, keys=("a", "b"), error=ThingError, what="thing")


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out.txt"
    write_text(path, "old")
    write_text(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.txt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file(tmp_path, failure):
    path = tmp_path / "out.bin"
    write_text(path, "old")
    with pytest.raises(type(failure)), atomic_write(path) as handle:
        handle.write(b"half a file")
        raise failure
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_save_torch_file_fails_before_touching_the_folder(tmp_path):
    with pytest.raises(Exception, match=r"lambda|pickle|local object"):
        save_torch_file({"f": lambda: 0}, tmp_path / "x.pt")
    assert os.listdir(tmp_path) == []


def test_load_torch_file_names_the_file(tmp_path):
    good = save_torch_file({"w": torch.ones(2)}, tmp_path / "good.pt")
    assert torch.equal(load_torch_file(good)["w"], torch.ones(2))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ThingError, match=r"truncated\.pt: cannot read the thing file.*advice"):
        load_torch_file(truncated, what="thing file", error=ThingError, hint="advice")
    text = tmp_path / "text.pt"
    text.write_text("not torch")
    with pytest.raises(LibraryFileError, match=r"text\.pt: cannot read"):
        load_torch_file(text)
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "absent.pt")


def test_file_format_round_trip_and_header(tmp_path):
    path = THING.save({"a": 1, "b": [2, 3]}, tmp_path / "thing.pt")
    payload = THING.load(path)
    assert payload["a"] == 1 and payload["b"] == [2, 3]
    assert payload["format"] == "test.Thing" and payload["format_version"] == 2
    assert payload["dwp_version"] == dwp.__version__
    with pytest.raises(ValueError, match=r"needs keys \['b'\]"):
        THING.save({"a": 1}, tmp_path / "incomplete.pt")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"format": "test.Thing", "format_version": 1, "a": 0, "b": 0}, None),  # older: read
        ({"format": "test.Thing", "format_version": 3, "a": 0}, "version 3 is not readable"),
        ({"format": "test.Thing", "format_version": True, "a": 0}, "version True"),
        ({"format": "test.Thing", "format_version": "2", "a": 0}, "version '2'"),
        ({"format": "test.Thing", "format_version": 0, "a": 0}, "version 0"),
        ({"format": "other", "format_version": 2}, r"not a thing file \(test\.Thing\)"),
        ([1, 2], "it holds a list"),
        ({"format": "test.Thing", "format_version": 2, "a": 0}, r"misses keys \['b'\]"),
    ],
)
def test_file_format_check(tmp_path, payload, message):
    path = tmp_path / "f.pt"
    if message is None:
        assert THING.check(payload, path) is payload
        return
    with pytest.raises(ThingError, match=f"^{path}: .*{message}"):
        THING.check(payload, path)


def test_write_json_and_check_plain(tmp_path):
    write_json(tmp_path / "x.json", {"b": 1}, indent=None)
    assert (tmp_path / "x.json").read_text() == '{"b": 1}\n'
    check_plain({"a": [1, 2.0, None, ("x", True)]}, "metadata")
    with pytest.raises(TypeError, match=r"metadata\['a'\]\[0\] holds a object"):
        check_plain({"a": [object()]}, "metadata")
