"""kit.filewatch: a file's parsed value follows replacements of the file, keeps the last good
value through a bad one, and costs no read while the file is unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kit import filewatch
from kit.filewatch import FileWatch
from tests.support.logs import capture


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def parse_number(contents: list[bytes]) -> int:
    return int(contents[0])


def secret_dir(root: Path, version: str, files: dict[str, bytes]) -> None:
    """Publish `files` the way the kubelet updates a Secret volume: write them into a new
    directory, then swap the `..data` symlink to it in one rename."""
    target = root / f"..{version}"
    target.mkdir()
    for name, content in files.items():
        (target / name).write_bytes(content)
    link = root / "..data_tmp"
    link.symlink_to(target.name)
    os.replace(link, root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            (root / name).symlink_to(Path("..data") / name)


def test_a_symlink_swap_is_seen_at_the_next_check(tmp_path: Path) -> None:
    secret_dir(tmp_path, "v1", {"value": b"1"})
    clock = Clock()
    watch = FileWatch([tmp_path / "value"], parse_number, what="test", clock=clock)
    assert (watch.get(), watch.generation) == (1, 0)

    secret_dir(tmp_path, "v2", {"value": b"2"})
    assert watch.get() == 1  # not checked again within the interval
    clock.now = 1.0
    assert (watch.get(), watch.generation) == (2, 1)


def test_a_half_written_file_keeps_the_last_good_value_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "value"
    path.write_bytes(b"10")
    clock = Clock()
    watch = FileWatch([path], parse_number, what="test", clock=clock)

    path.write_bytes(b"2x")  # a writer caught half-way
    logs = capture(monkeypatch, filewatch)
    for second in range(1, 4):
        clock.now = float(second)
        assert watch.get() == 10
    warnings = [line for line in logs if line["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["what"] == "test"
    assert watch.generation == 0

    path.write_bytes(b"2x0")  # the write completes: a new stat, parsed again
    path.write_bytes(b"200")
    clock.now = 4.0
    assert (watch.get(), watch.generation) == (200, 1)


def test_a_file_missing_mid_swap_keeps_the_last_good_value(tmp_path: Path) -> None:
    path = tmp_path / "value"
    path.write_bytes(b"1")
    clock = Clock()
    watch = FileWatch([path], parse_number, what="test", clock=clock)
    path.unlink()
    clock.now = 1.0
    assert watch.get() == 1
    path.write_bytes(b"3")
    clock.now = 2.0
    assert (watch.get(), watch.generation) == (3, 1)


def test_an_unchanged_file_is_not_read_again(tmp_path: Path) -> None:
    path = tmp_path / "value"
    path.write_bytes(b"7")
    parsed: list[list[bytes]] = []

    def counting(contents: list[bytes]) -> int:
        parsed.append(contents)
        return parse_number(contents)

    clock = Clock()
    watch = FileWatch([path], counting, what="test", clock=clock)
    for second in range(1, 20):
        clock.now = float(second)
        assert watch.get() == 7
    assert len(parsed) == 1


def test_files_parsed_together_change_together(tmp_path: Path) -> None:
    """A pair whose halves do not match yet (one renewed, the other not) keeps the old pair."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"1")
    second.write_bytes(b"1")
    # Each write below changes a file's size: two writes of the same size within the
    # filesystem's timestamp granularity would leave its stat unchanged (FileWatch).

    def same(contents: list[bytes]) -> bytes:
        if contents[0] != contents[1]:
            raise ValueError("the files do not belong together")
        return contents[0]

    clock = Clock()
    watch = FileWatch([first, second], same, what="pair", clock=clock)
    first.write_bytes(b"22")
    clock.now = 1.0
    assert watch.get() == b"1"
    second.write_bytes(b"22")
    clock.now = 2.0
    assert watch.get() == b"22"


def test_a_bad_file_at_start_raises(tmp_path: Path) -> None:
    path = tmp_path / "value"
    path.write_bytes(b"not a number")
    with pytest.raises(ValueError, match="invalid literal"):
        FileWatch([path], parse_number, what="test")
