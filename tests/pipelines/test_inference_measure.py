"""The inference report's rows, through the real export path: tiny BERT folders saved as the training
stages save them, exported with torch.onnx, checked and timed in ONNX Runtime; an int8 QAT export;
and the bad inputs (runtime not installed, a model that does not convert), which give a row that
says why instead of failing."""
import json
import os
import sys
import types

import onnx
import torch
from safetensors.torch import load_file
from torch import nn

from pipelines.finetune.qat import export_int8
from pipelines.inference.config import InferenceConfig
from pipelines.inference.export_onnx import InferenceModel, load_for_inference
from pipelines.inference.measure import ModelEntry, _int8_state, inference_report, measure_module
from tests.pipelines.inference_models import SEQ, classifier, export, pretraining_model

CFG = InferenceConfig(batch_sizes=[1, 4], seq_len=SEQ, min_seconds=0.05)


def test_dense_and_sparse_exports_are_converted_checked_and_timed(tmp_path) -> None:
    teacher = export(pretraining_model(0), str(tmp_path / "teacher"))
    student = export(pretraining_model(1, sparsity=0.9), str(tmp_path / "student"))
    report = inference_report([ModelEntry("teacher", teacher), ModelEntry("student", student, "teacher")], CFG)
    rows = {r["name"]: r for r in report["models"]}
    assert report["runtime"] == "onnxruntime" and report["runtime_version"]
    assert report["latency_batch"] == 1 and report["throughput_batch"] == 4
    for name, row in rows.items():
        assert row["error"] is None, row
        assert row["graph"] == "encoder"  # the MLM + NSP heads are not what a downstream task runs
        assert row["max_abs_diff"] < 1e-4  # ONNX Runtime computes what PyTorch computes
        assert set(row["timings"]) == {"1", "4"} and all(t["runs"] >= 3 for t in row["timings"].values())
        assert row["latency_ms"] == row["timings"]["1"]["ms"] > 0
        assert row["throughput_seq_s"] == row["timings"]["4"]["seq_per_s"] > 0
        assert row["safetensors_bytes"] == os.path.getsize(os.path.join(row["folder"], "model.safetensors"))
    assert rows["teacher"]["onnx"] == "exported"
    assert rows["student"]["onnx"] == "weights swapped into the teacher graph"  # and still checked against torch
    assert rows["teacher"]["sparsity"] == 0.0 and abs(rows["student"]["sparsity"] - 0.9) < 0.01
    assert rows["student"]["sparse_bytes"] < 0.8 * rows["teacher"]["sparse_bytes"]
    assert rows["teacher"]["throughput_speedup"] == 1.0
    expected = rows["student"]["throughput_seq_s"] / rows["teacher"]["throughput_seq_s"]
    assert abs(rows["student"]["throughput_speedup"] - expected) < 1e-2
    for key in ("latency_speedup_range", "throughput_speedup_range"):  # round by round, in turns with the teacher
        lo, hi = rows["student"][key]
        assert 0 < lo <= hi
    assert report["cores"] == os.cpu_count() and len(report["load_avg"]) == 2
    assert len(rows["student"]["timings"]["1"]["round_ms"]) == 5 and rows["student"]["latency_spread"] >= 0
    assert json.loads(json.dumps(report)) == report  # what inference.json will hold


def test_a_swapped_graph_computes_the_second_models_outputs(tmp_path) -> None:
    a = load_for_inference(export(classifier(0), str(tmp_path / "a")))
    b = load_for_inference(export(classifier(1, sparsity=0.9), str(tmp_path / "b")))
    templates: dict = {}
    (tmp_path / "wa").mkdir(), (tmp_path / "wb").mkdir()
    first = measure_module(a, CFG, str(tmp_path / "wa"), templates, "a")
    second = measure_module(b, CFG, str(tmp_path / "wb"), templates, "b")
    assert first["graph"] == "BertForSequenceClassification" and first["onnx"] == "exported"
    assert second["onnx"] == "weights swapped into the a graph" and second["max_abs_diff"] < 1e-4
    x = b.example_inputs(2, SEQ, seed=1)
    with torch.no_grad():
        assert (a(*x) - b(*x)).abs().max() > 1e-2  # so matching b really means b's weights are in the graph


def test_an_int8_qat_export_runs_quantized(tmp_path) -> None:
    folder = export(classifier(2, sparsity=0.9), str(tmp_path / "seed"))
    state = load_file(os.path.join(folder, "model.safetensors"))
    names = [n for n, t in state.items() if ".encoder." in n and n.endswith(".weight") and t.dim() == 2]
    export_int8(folder, names)
    work = tmp_path / "work"
    work.mkdir()
    state8, int8_names = _int8_state(ModelEntry("seed/int8", folder, int8=True))
    assert sorted(int8_names) == sorted(names)
    row = measure_module(load_for_inference(folder, state8), CFG, str(work), {}, "seed/int8", int8_names)
    assert row["onnx"].endswith("then ONNX Runtime dynamic int8") and row["latency_ms"] > 0
    ops = [n.op_type for n in onnx.load(str(work / "model.int8.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulInteger") == len(names)  # every QAT layer runs as an int8 matrix product
    assert row["max_abs_diff"] < 0.1  # int8 stays close to the dequantized fp32 model
    full = inference_report([ModelEntry("seed", folder), ModelEntry("seed/int8", folder, "seed", int8=True)], CFG)
    int8_row = full["models"][1]
    assert int8_row["error"] is None and int8_row["safetensors_bytes"] == os.path.getsize(
        os.path.join(folder, "int8", "model.int8.safetensors"))
    assert int8_row["sparse_bytes"] < full["models"][0]["sparse_bytes"]  # int8 non-zeros: fewer bytes again


def test_a_pretraining_exports_int8_weights_fit_its_encoder(tmp_path) -> None:
    """int8 weights of a student export (BERT-for-pretraining keys) time as its encoder, heads dropped."""
    folder = export(pretraining_model(6, sparsity=0.9), str(tmp_path / "student"))
    state = load_file(os.path.join(folder, "model.safetensors"))
    export_int8(folder, [n for n in state if ".encoder." in n and n.endswith(".weight") and state[n].dim() == 2])
    report = inference_report([ModelEntry("student", folder), ModelEntry("student/int8", folder, "student", int8=True)],
                              CFG)
    row = report["models"][1]
    assert row["error"] is None and row["graph"] == "encoder" and row["max_abs_diff"] < 0.1, row
    assert row["onnx"].endswith("then ONNX Runtime dynamic int8") and row["timed_with"] == "student"


def test_a_runtime_that_is_not_installed_gives_rows_that_say_so(tmp_path, monkeypatch) -> None:
    folder = export(pretraining_model(3, sparsity=0.9), str(tmp_path / "student"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    report = inference_report([ModelEntry("student", folder)], CFG)
    row = report["models"][0]
    assert report["runtime_version"] is None
    assert row["error"].startswith("onnxruntime is not installed")
    assert "latency_ms" not in row and row["latency_speedup"] is None
    assert row["safetensors_bytes"] > 0 and row["sparse_bytes"] > 0  # sizes need no runtime


class _Eig(nn.Module):
    """A model with an operator ONNX has no translation for (an eigen-decomposition)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.config = types.SimpleNamespace(vocab_size=10, to_dict=lambda: {})

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):  # noqa: ANN001
        return (torch.linalg.eigvals(self.lin(input_ids.float()[..., :4]).reshape(-1, 2, 2)).real,)


def test_a_model_that_cannot_be_converted_gives_a_row_with_the_reason(tmp_path, monkeypatch) -> None:
    good = export(pretraining_model(4), str(tmp_path / "good"))
    bad = export(pretraining_model(5), str(tmp_path / "bad"))
    import pipelines.inference.measure as measure

    real = measure.load_for_inference
    monkeypatch.setattr(measure, "load_for_inference",
                        lambda folder, state=None: InferenceModel(_Eig(), "eig") if folder == bad else real(folder, state))
    report = inference_report([ModelEntry("good", good), ModelEntry("bad", bad, "good"),
                               ModelEntry("gone", str(tmp_path / "missing"), "good")], CFG)
    rows = {r["name"]: r for r in report["models"]}
    assert rows["good"]["error"] is None and rows["good"]["latency_ms"] > 0  # the others are still measured
    assert rows["bad"]["error"].startswith("cannot convert: torch.onnx.export failed")
    assert "linalg_eig" in rows["bad"]["error"] and rows["bad"]["latency_speedup"] is None
    assert rows["bad"]["safetensors_bytes"] > 0  # its sizes are still reported
    assert rows["gone"]["error"].startswith("sizes: ") and "model.safetensors" in rows["gone"]["error"]


class _Drifting:
    """A session whose run time grows with the clock: the machine's load rising during a measurement."""

    def __init__(self, name: str, calls: list, t0: float) -> None:
        self.name, self.calls, self.t0 = name, calls, t0

    def run(self, _outputs, feed) -> None:  # noqa: ANN001
        import time

        self.calls.append(self.name)
        time.sleep(0.001 * (1 + 10 * (time.perf_counter() - self.t0)))


def test_a_model_and_its_reference_take_turns_so_a_load_change_falls_on_both() -> None:
    """Timed one after the other, two identical models would differ by the drift (the second slower);
    in turns, the ratio stays near 1 and both get runs in every round."""
    import time

    from pipelines.inference.bench import ROUNDS, TimedSession, time_sessions

    calls: list[str] = []
    t0 = time.perf_counter()
    a, b = (TimedSession(_Drifting(n, calls, t0), ["input_ids"], 10) for n in ("a", "b"))
    ta, tb = time_sessions([a, b], [1], 8, min_seconds=0.3)
    ratio = tb[1]["ms"] / ta[1]["ms"]
    assert 0.8 < ratio < 1.25, (ta, tb)
    assert ta[1]["runs"] >= ROUNDS and tb[1]["runs"] >= ROUNDS
    switches = sum(1 for x, y in zip(calls, calls[1:]) if x != y)
    assert switches >= ROUNDS  # a, b, then b, a, ...: turns, not one block each
    calls.clear()
    t0 = time.perf_counter()
    (seq_a,) = time_sessions([TimedSession(_Drifting("a", calls, t0), ["input_ids"], 10)], [1], 8, min_seconds=0.3)
    (seq_b,) = time_sessions([TimedSession(_Drifting("b", calls, t0), ["input_ids"], 10)], [1], 8, min_seconds=0.3)
    assert seq_b[1]["ms"] / seq_a[1]["ms"] > 1.5  # what timing them apart would have reported


class SleepySession:
    """An ONNX Runtime stand-in at the session boundary: each run sleeps the time its round gives
    (the load of a busy machine falling on one model's turns and not the other's)."""

    def __init__(self, ms_by_round: list[float]) -> None:
        self.ms_by_round, self.calls = ms_by_round, 0

    def run(self, _outputs, _feed) -> None:
        import time

        self.calls += 1
        rnd = min(max(self.calls - 2, 0), len(self.ms_by_round) - 1)  # call 1: the warm-up; then one run a turn
        time.sleep(self.ms_by_round[rnd] / 1000)


def test_a_ratio_whose_rounds_disagree_is_marked_unsteady() -> None:
    from pipelines.inference.bench import TimedSession, time_sessions
    from pipelines.inference.measure import round_ratios, unsteady

    # min_seconds below one run: one run per turn, five turns each; sleeps of tens of ms, so that a
    # few ms of a busy machine's scheduling jitter cannot move a ratio across the bounds
    steady_ref, steady_row = SleepySession([40.0] * 5), SleepySession([20.0] * 5)
    ref_t, row_t = time_sessions([TimedSession(steady_ref, ["input_ids"], 2), TimedSession(steady_row, ["input_ids"], 2)],
                                 [1], 8, min_seconds=0.001)
    assert len(ref_t[1]["round_ms"]) == 5 and ref_t[1]["ms_p25"] <= ref_t[1]["ms"] <= ref_t[1]["ms_p75"]
    lo, hi = round_ratios(ref_t[1], row_t[1])
    assert 1.4 < lo <= hi < 2.6  # 40 ms against 20 ms in every round, give or take the sleeps' jitter (ms)
    assert round_ratios({"round_ms": [2.0, 4.0, 2.0]}, {"round_ms": [1.0, 2.0, 4.0]}) == [0.5, 2.0]
    assert unsteady([[0.95, 1.1]]) is None
    message = unsteady([[0.95, 1.1], [0.47, 1.78]])
    assert message.startswith("x dense ranged 0.47-1.78 over the timing rounds")
    busy_ref, busy_row = SleepySession([40.0] * 5), SleepySession([20.0, 20.0, 80.0, 80.0, 20.0])
    ref_t, row_t = time_sessions([TimedSession(busy_ref, ["input_ids"], 2), TimedSession(busy_row, ["input_ids"], 2)],
                                 [1], 8, min_seconds=0.001)
    lo, hi = round_ratios(ref_t[1], row_t[1])
    assert lo < 0.7 and hi > 1.5 and unsteady([[lo, hi]]) is not None  # 0.5 in the busy rounds, 2 in the rest
