"""Where the persistent tier lives: paths versus URLs, and a bad URL caught at start."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from gemini_ckpt.errors import ConfigError
from gemini_ckpt.store.files import Files, FsspecFiles, LocalFiles, open_files, parse_location


def test_paths_stay_local_and_urls_keep_their_double_slash():
    assert parse_location("") is None
    assert parse_location("ckpt/dir") == Path("ckpt/dir")
    assert parse_location("file:///mnt/ckpt") == "file:///mnt/ckpt"
    assert isinstance(open_files("/mnt/ckpt"), LocalFiles)
    assert isinstance(open_files("memory://bucket/prefix"), FsspecFiles)


@pytest.mark.parametrize(
    ("url", "why"),
    [("bogus://x", "Protocol not known: bogus"), ("s3://bucket/x", "Install s3fs")],
)
def test_an_unusable_url_is_a_flag_error_naming_it(url, why):
    with pytest.raises(ConfigError, match=f"--persist-dir: cannot use '{url}'.*{why}"):
        parse_location(url)


def test_fsspec_files_write_list_rename_and_remove():
    files = open_files(f"memory://files-test-{uuid.uuid4().hex}")
    step = files.join(files.root, "job", "step-1")
    files.makedirs(step)
    with files.open_write(files.join(step, "data"), atomic=False) as f:
        f.write(b"x" * 10)
    with files.open_write(files.join(step, "manifest"), atomic=True) as f:
        f.write(b"{}")
    assert sorted(files.listdir(step)) == ["data", "manifest"]
    assert files.listdir(files.join(files.root, "missing")) == []
    files.rename(files.join(step, "manifest"), files.join(step, "manifest.corrupt"))
    with pytest.raises(FileNotFoundError):
        files.rename(files.join(step, "manifest"), files.join(step, "other"))
    with files.open_read(files.join(step, "data")) as f:
        assert f.read() == b"x" * 10
    files.remove_tree(files.join(files.root, "job"))
    assert files.listdir(step) == []


def write_then_die(files: Files, path: str) -> None:
    with files.open_write(path, atomic=True) as f:
        f.write(b"partial")
        raise RuntimeError("writer died")


def test_a_failed_write_leaves_nothing_under_either_name(tmp_path):
    for files in (open_files(tmp_path), open_files(f"memory://files-test-{uuid.uuid4().hex}")):
        files.makedirs(files.root)
        with pytest.raises(RuntimeError, match="writer died"):
            write_then_die(files, files.join(files.root, "manifest"))
        assert files.listdir(files.root) == []
