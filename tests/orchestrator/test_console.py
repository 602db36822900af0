"""The console of `pofa run`: a live line per stage that a log file sees at most once per tenth of the
stage and a terminal sees redrawn in place; lines from deeper code (`say`) arrive above it."""
from __future__ import annotations

import io

from orchestrator.console import Console, as_console, format_duration, progress_line, source_progress_line
from workers.console_lines import say


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _feed(console: Console, clock: Clock, stage: str, steps: range, sparsity: bool = False) -> None:
    for step in steps:
        clock.t += 0.5
        metrics = {"loss": 10.0 / step, "throughput/samples_per_s": 64.0}
        if sparsity and step % 20 == 0:  # logged on pruning steps only: the line keeps the last value
            metrics["sparsity/global"] = min(0.9, step / 300)
        console.progress(stage, step, metrics)


def test_a_log_file_gets_at_most_one_line_per_tenth_of_the_stage() -> None:
    out, clock = io.StringIO(), Clock()
    console = Console(out, tty=False, clock=clock)
    console("[student] running")
    console.begin("student", 300)
    _feed(console, clock, "student", range(1, 301), sparsity=True)
    console.end("student")
    lines = out.getvalue().splitlines()
    progress = [line for line in lines if "step " in line]
    assert 1 < len(progress) <= 10
    assert progress[0].startswith("[student] step 1/300 (0%)")
    assert progress[-1].startswith("[student] step 270/300 (90%)")  # the result line says 100%
    assert "sparsity 0.867" in progress[-1] and "64 samples/s" in progress[-1] and "ETA 15s" in progress[-1]
    assert "\r" not in out.getvalue()


def test_a_resumed_stage_counts_from_where_it_resumed() -> None:
    out, clock = io.StringIO(), Clock()
    console = Console(out, tty=False, clock=clock)
    console.begin("teacher", 500)
    _feed(console, clock, "teacher", range(301, 501))
    progress = out.getvalue().splitlines()
    assert progress[0].startswith("[teacher] step 301/500 (60%)") and len(progress) == 4  # 60, 70, 80, 90%
    assert "sparsity" not in progress[0]  # the dense teacher has none


def test_a_terminal_redraws_the_live_line_and_keeps_lines_above_it() -> None:
    out, clock = io.StringIO(), Clock()
    console = Console(out, tty=True, clock=clock)
    console.begin("teacher", 100)
    _feed(console, clock, "teacher", range(1, 11))
    console("[finetune] polarity/seed-42 started")
    text = out.getvalue()
    assert text.count("\r\x1b[K") >= 5  # redrawn in place, not appended
    before, after = text.rsplit("[finetune] polarity/seed-42 started\n", 1)
    assert before.endswith("\r\x1b[K")  # the live line is cleared before a line that stays...
    assert after.startswith("[teacher] step 10/100")  # ...and drawn again below it
    console.end("teacher")
    assert out.getvalue().endswith("\r\x1b[K")


def test_progress_of_a_stage_without_a_live_line_is_ignored() -> None:
    out = io.StringIO()
    console = Console(out, tty=False)
    console.progress("finetune/polarity/seed-42", 3, {"loss": 1.0})
    assert out.getvalue() == ""


def test_say_reaches_the_attached_console_and_prints_without_one(capsys) -> None:
    out = io.StringIO()
    console = Console(out, tty=False)
    detach = console.attach()
    try:
        say("[teacher] a node was preempted at step 7: resuming from its checkpoint")
    finally:
        detach()
    assert out.getvalue() == "[teacher] a node was preempted at step 7: resuming from its checkpoint\n"
    say("plain")
    assert capsys.readouterr().out == "plain\n"


def test_a_plain_callable_gets_the_lines_and_no_live_line() -> None:
    seen: list[str] = []
    console = as_console(seen.append)
    console.begin("teacher", 10)
    console.progress("teacher", 5, {"loss": 1.0})
    console("[teacher] done")
    assert seen == ["[teacher] done"] and console.verbose  # a library caller's output is left where it is


def test_formats() -> None:
    assert format_duration(42.4) == "42s" and format_duration(125) == "2m05s" and format_duration(7322) == "2h02m"
    line = progress_line("student", 150, 300, {"loss": 2.5, "sparsity/global": 0.45}, 90)
    assert line == "[student] step 150/300 (50%)  loss 2.5000  sparsity 0.450  ETA 1m30s"
    kd = progress_line("student", 150, 300, {"loss": 2.5, "loss/hard": 3.0, "loss/kd": 2.0}, None)
    assert kd == "[student] step 150/300 (50%)  loss 2.5000 (hard 3.000, KD 2.000)"


def test_the_preprocess_line_counts_source_bytes_and_begins_with_its_first_report() -> None:
    """The preprocess stage learns its total (the source's bytes) when it lists its read units; its
    first report starts the live line, a log file still gets at most one line per tenth."""
    out, clock = io.StringIO(), Clock()
    console = Console(out, tty=False, clock=clock)
    total = 2_400_000_000
    for shard in range(1, 101):
        clock.t += 3.0
        console.report("preprocess", shard * total // 100, total,
                       {"shards": shard, "tokens": shard * 1.5e6, "throughput/tokens_per_s": 5e5, "by_bytes": 1.0},
                       render=source_progress_line)
    lines = out.getvalue().splitlines()
    assert 1 < len(lines) <= 10
    assert lines[0] == "[preprocess] 24.0 MB/2.4 GB of source read (1%)  1 shards  1.5M tokens  500.0k tokens/s"
    assert lines[-1].startswith("[preprocess] 2.2 GB/2.4 GB of source read (90%)  90 shards  135.0M tokens")
    assert lines[-1].endswith("ETA 30s")  # 10 shards left at 3 s each
    hub = source_progress_line("preprocess", 3, 64, {"by_bytes": 0.0, "shards": 12}, None)
    assert hub == "[preprocess] 3/64 dataset shards read (4%)  12 shards"
