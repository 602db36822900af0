"""`atomic_dir`: a folder is replaced whole or not at all, and a reader never finds it missing."""
from __future__ import annotations

import os
import threading

import pytest

from pipelines import atomic
from pipelines.atomic import atomic_dir, exchange_paths


def _build(path: str, text: str) -> None:
    with atomic_dir(path) as tmp:
        with open(os.path.join(tmp, "a.txt"), "w") as f:
            f.write(text)


def _read(path: str) -> str:
    with open(os.path.join(path, "a.txt")) as f:
        return f.read()


def test_replaces_the_folder_and_leaves_nothing_beside_it(tmp_path) -> None:
    path = str(tmp_path / "tokenizer")
    _build(path, "one")
    _build(path, "two")
    assert _read(path) == "two"
    assert sorted(os.listdir(tmp_path)) == ["tokenizer"]


def test_an_error_in_the_block_keeps_the_old_folder(tmp_path) -> None:
    path = str(tmp_path / "model")
    _build(path, "good")
    with pytest.raises(RuntimeError):
        with atomic_dir(path) as tmp:
            open(os.path.join(tmp, "a.txt"), "w").write("half")
            raise RuntimeError("killed mid-write")
    assert _read(path) == "good" and sorted(os.listdir(tmp_path)) == ["model"]


def test_this_machine_swaps_two_folders_in_one_step(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").touch()
    assert exchange_paths(str(a), str(b))
    assert os.listdir(b) == ["x"] and os.listdir(a) == []


def test_a_reader_never_finds_the_folder_missing(tmp_path) -> None:
    path = str(tmp_path / "data")
    _build(path, "0")
    missing: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not os.path.isdir(path):
                missing.append(1)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        for i in range(300):
            _build(path, str(i))
    finally:
        stop.set()
        reader.join()
    assert missing == [] and _read(path) == "299"


def test_without_the_swap_a_crash_between_the_renames_is_undone(tmp_path, monkeypatch) -> None:
    """Two renames where the kernel cannot swap; killed between them, the old folder is `<path>.old`
    and the next call puts it back before anything else."""
    monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: False)
    path = str(tmp_path / "data")
    _build(path, "committed")
    real_replace = os.replace

    def killed(src: str, dst: str) -> None:
        if dst == path:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _build(path, "new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not os.path.exists(path) and _read(path + ".old") == "committed"
    with pytest.raises(RuntimeError):
        with atomic_dir(path):
            raise RuntimeError("a failed rebuild")
    assert _read(path) == "committed"
    _build(path, "new")
    assert _read(path) == "new" and sorted(os.listdir(tmp_path)) == ["data"]
