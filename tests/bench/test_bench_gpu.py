"""`make bench-gpu` cannot rot: its measurements run here at a tiny shape on the CPU, and the command
says "no GPU" in one line and exits 0 on a machine without one."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.bench import bench_gpu
from tests.bench.gpu import report
from tests.bench.gpu.flops import matmul_tflops, mfu, model_flops, peak_tflops
from tests.bench.gpu.kd_loss import measure_kd_kernel
from tests.bench.gpu.shapes import TINY
from tests.bench.gpu.sparse24 import is_two_four, measure_sparse24
from tests.bench.gpu.timing import Budget, Plan, Skip, time_calls

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _plan(seconds: float = 120.0) -> Plan:
    return Plan(budget=Budget(seconds), warmup=1, iters=2)


def _finite_timing(row: dict) -> bool:
    return row["n"] >= 1 and all(math.isfinite(ms) and ms > 0 for ms in row["ms"])


def test_make_bench_gpu_says_no_gpu_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "never.json"
    done = subprocess.run(["make", "-s", "bench-gpu", f"BENCH_ARGS=--out {out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench-gpu: no GPU"), done.stdout
    assert not out.exists()


def test_kd_kernel_matches_the_straightforward_loss_at_tiny_shape():
    r = measure_kd_kernel(CPU, TINY, _plan())
    assert 0 < r["rows"] <= TINY.tokens  # the non-padding positions
    assert r["value_rel_diff"] < report.KD_VALUE_TOLERANCE and r["grad_max_abs_diff"] < 1e-3
    assert math.isfinite(r["value_kernel"]) and r["value_kernel"] > 0  # two different logit sets: KL > 0
    assert _finite_timing(r["kernel"]) and _finite_timing(r["straightforward"]) and r["speedup"] > 0


def test_sparse24_runs_up_to_the_cuda_only_kernels():
    r = measure_sparse24(CPU, TINY, _plan())
    assert r["pattern_2_4"]
    # every pruned Linear shape of the tiny BERT: q/k/v/o + pooler, intermediate, output
    assert {k: v["count"] for k, v in r["linears"].items()} == {"64x64": 9, "128x64": 2, "64x128": 2}
    for row in r["linears"].values():
        assert _finite_timing(row["dense"])
        assert set(row["skipped"]) == {"cusparselt", "cutlass"}  # torch's kernels: CUDA only
        assert all("CUDA" in why for why in row["skipped"].values())
    assert r["linears_per_forward_ms_dense"] > 0 and "student_forward" in r["skipped"]


def test_two_four_check_refuses_another_pattern():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 4))
    keep = torch.tensor([1, 1, 0, 0] * 8, dtype=torch.bool).reshape(4, 8)
    with torch.no_grad():
        layer[0].weight.mul_(keep)
    assert is_two_four(layer, {"0.weight": keep})
    three_of_four = keep.clone()
    three_of_four[0, 2] = True  # one group keeps 3
    assert not is_two_four(layer, {"0.weight": three_of_four})
    with torch.no_grad():
        layer[0].weight[0, 3] = 1.0  # a pruned entry the forward would see
    assert not is_two_four(layer, {"0.weight": keep})


def test_flops_count_each_linear_once_and_the_heads_per_sequence():
    from transformers import BertConfig, BertForPreTraining

    with torch.device("meta"):  # BERT-Base's modules without its weights
        model = BertForPreTraining(BertConfig())
    f = model_flops(model, seq=128)
    per_token = 12 * (4 * 768**2 + 2 * 768 * 3072) + 768**2 + 30522 * 768  # encoder, MLM transform, tied decoder
    per_sequence = 768**2 + 2 * 768  # pooler, NSP head
    assert f.linear_params == per_token + per_sequence
    assert f.forward_per_token == pytest.approx(2 * per_token + 2 * per_sequence / 128 + 4 * 12 * 128 * 768)
    assert f.train_per_token == pytest.approx(3 * f.forward_per_token)
    assert mfu(989.4e12 / 1000, 1.0, 989.4) == pytest.approx(1.0)  # a step of peak FLOPs in 1 ms
    assert mfu(1.0, 1.0, None) is None


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA L40S", 362.1),
                                        ("NVIDIA L4", 121.0), ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_peak_table_matches_the_most_specific_name(name, peak):
    assert peak_tflops(name)[0] == peak
    assert peak_tflops(name, override=500.0) == (500.0, "--peak-tflops")


def test_unknown_device_has_no_peak_until_given_one():
    peak, why = peak_tflops("Some Future GPU")
    assert peak is None and "--peak-tflops" in why
    assert matmul_tflops(CPU, 64, iters=2) > 0


def test_time_calls_stops_at_the_budget():
    # an instant warm-up, then 50 ms calls against half a second
    timing = time_calls(lambda i: time.sleep(0.05 if i else 0.0), CPU, warmup=1, iters=50, budget=Budget(0.5))
    assert timing.truncated and 1 <= len(timing.ms) < 50
    calls: list[int] = []
    with pytest.raises(Skip, match="warm-up"):  # spent before anything was timed
        time_calls(calls.append, CPU, warmup=1, iters=1, budget=Budget(0.0))
    assert calls == [0]


def test_spent_budget_skips_every_measurement_with_a_line_each(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = tmp_path / "b.json"
    assert bench_gpu.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--out", str(out)]) == 0
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(bench_gpu.MEASUREMENTS) and all("time budget" in line for line in skipped)
    data = json.loads(out.read_text())
    assert data["results"] == {} and set(data["skipped"]) == set(bench_gpu.MEASUREMENTS) and data["complete"]
    assert out.with_suffix(".txt").read_text().count("skipped:") == len(bench_gpu.MEASUREMENTS)


def test_hard_limit_writes_what_it_has_and_stops(tmp_path):
    record = report.Record(str(tmp_path / "r.json"), {"device": bench_gpu.device_info(CPU, None),
                                                      "shape": TINY.as_dict()})
    record.data["results"]["probe"] = {"kept": True}
    said, stopped = [], []
    dog = report.Watchdog(0.0, record, said.append, stop=stopped.append)
    dog.current = "teacher_step"
    dog._fire()
    data = json.loads((tmp_path / "r.json").read_text())
    assert stopped == [3] and "teacher_step" in said[0] and data["results"] == {"probe": {"kept": True}}
    assert "hard time limit" in data["failed"]["teacher_step"]


def test_step_rows_run_on_the_torch_fallback_with_exact_masks():
    from tests.bench.gpu.train_steps import measure_student_step, measure_teacher_step

    teacher = measure_teacher_step(CPU, TINY, _plan(), deepspeed=False)
    student = measure_student_step(CPU, TINY, _plan(), deepspeed=False)
    for row in (teacher, student):
        assert row["engine"].startswith("torch AdamW") and _finite_timing(row) and row["tokens_per_s"] > 0
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
    masks = student["masks"]
    assert masks["exact"] and masks["live_nonzero_at_pruned"] == 0 and masks["stored_nonzero_at_pruned"] > 0
    assert masks["timed_steps_without_update"] and max(masks["updates_at_steps"]) == 2  # ramp ends in the warm-up


@pytest.mark.integration  # starts DeepSpeed (one process, gloo on the CPU) in a subprocess
def test_every_measurement_runs_at_tiny_shape_on_the_cpu_with_deepspeed(tmp_path):
    out = tmp_path / "bench-gpu.json"
    done = subprocess.run([sys.executable, "tests/bench/bench_gpu.py", "--device", "cpu", "--tiny", "--warmup", "1",
                           "--iters", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["complete"] and not data["failed"] and not data["skipped"] and all(data["checks"].values())
    res = data["results"]
    for name in ("teacher_step", "student_step"):
        row = res[name]
        assert row["engine"].startswith("DeepSpeed ZeRO-2 bf16"), row["engine"]  # pofa's engine, not the fallback
        assert _finite_timing(row) and row["tokens_per_s"] > 0 and row["flops_per_step"] > 0
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
    masks = res["student_step"]["masks"]
    assert masks["exact"] and masks["counts_exact"] and masks["live_nonzero_at_pruned"] == 0
    assert masks["mask_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert masks["stored_nonzero_at_pruned"] > 0  # keep: the fp32 master copy holds the pruned values
    assert masks["updates_at_steps"] and masks["timed_steps_without_update"]
    # the KD step runs the teacher forward too: more FLOPs than the teacher stage's step
    assert res["student_step"]["flops_per_step"] > res["teacher_step"]["flops_per_step"]
    assert "masks exact after the KD steps" in out.with_suffix(".txt").read_text()
