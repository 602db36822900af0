"""One first line of an error for every console line and failure record."""
from __future__ import annotations

from workers.errors import first_line


def test_a_ray_wrapped_error_gives_the_error_line_not_the_traceback_head() -> None:
    wrapped = RuntimeError("ray::TrainWorker.run() (pid=12, ip=10.0.0.2)\n  File \"x.py\", line 3, in f\n"
                           "    raise ValueError('bad shard')\nValueError: bad shard 17 of 40\n")
    assert first_line(wrapped) == "ValueError: bad shard 17 of 40"


def test_a_plain_error_gets_its_type_and_a_length_limit() -> None:
    assert first_line(OSError("disk full\nmore detail")) == "OSError: disk full"
    assert first_line(KeyError()) == "KeyError"
    assert len(first_line(RuntimeError("x" * 1000), 200)) == len("RuntimeError: ") + 200
