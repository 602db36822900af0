"""Student stage on real Ray Train + DeepSpeed (2 workers, ZeRO-2, CPU): KD from the frozen teacher,
gradual magnitude pruning to 90% (schedule steps 0, 2, 4: masks computed before updates 2, 4 and 6, the
reference's timing), pruned weights kept behind the masks, export with its sparsity report.

Kill test: checkpoints every step (last 2 kept); the driver is SIGKILLed after 5 optimizer steps,
the newest checkpoint (5) is then truncated, and the rerun falls back to step 4. The steps from 4 to 6,
the second of which recomputes the masks for the last time from the stored values, are trained twice:
once by the first attempt, once after the resume. Every loss must agree to 1e-5 with an uninterrupted
run, and the final masks and exported weights with its."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, AutoModelForQuestionAnswering

from tests.workers.train_fixture import (checkpoint_masks, committed_steps, make_preprocess, make_teacher_export,
                                        read_losses, start_ray, student_spec)
from workers.run_records import TrainSummary, read_record
from workers.train.checkpoint_parts import DS_TAG
from workers.train.driver import run_training

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_for_free_cpus(cpus: float, limit_s: float = 120) -> None:
    deadline = time.time() + limit_s
    while ray.available_resources().get("CPU", 0) < cpus and time.time() < deadline:
        time.sleep(1)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    start_ray()
    run_dir = str(tmp_path_factory.mktemp("student"))
    make_preprocess(run_dir)
    make_teacher_export(run_dir)
    marker = os.path.join(run_dir, "stalled")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    driver = subprocess.Popen([sys.executable, "-m", "tests.workers.train_fixture", run_dir, marker], cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while not os.path.exists(marker) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert os.path.exists(marker), f"the driver never reached step 5 (exit code {driver.poll()})"
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver dies mid-stage, without any clean-up
        driver.wait()
    spec = student_spec(run_dir, checkpoint_every=1)
    checkpoints = committed_steps(spec)
    losses_before = read_losses(spec.run.metrics)
    newest = os.path.join(spec.run.checkpoint_step(5), DS_TAG)
    shard = os.path.join(newest, sorted(os.listdir(newest))[-1])
    with open(shard, "r+b") as f:  # a half-written file in the newest checkpoint
        f.truncate(os.path.getsize(shard) // 2)
    wait_for_free_cpus(2)  # Ray releases the dead driver's workers
    result = run_training(spec, echo=False)
    return spec, result, checkpoints, losses_before


def test_kill_left_two_checkpoints_and_five_steps(killed_and_resumed):
    _, _, checkpoints, losses_before = killed_and_resumed
    assert checkpoints == [5, 4]
    assert sorted(losses_before) == [1, 2, 3, 4, 5]


def test_rerun_falls_back_and_reproduces_the_uninterrupted_steps(killed_and_resumed):
    spec, result, _, _ = killed_and_resumed
    assert result.final_step == 6
    assert result.start_steps == [0, 4]  # step 5 was set aside as corrupt, step 4 used
    # set aside, then removed once the resumed run committed newer checkpoints
    assert not [n for n in os.listdir(spec.run.checkpoints) if n.startswith("corrupt-")]
    assert committed_steps(spec) == [6, 5]
    losses = read_losses(spec.run.metrics)
    assert [len(losses[s]) for s in range(1, 7)] == [1, 1, 1, 1, 2, 1]  # 5: before and after the kill
    assert losses[5][1] == pytest.approx(losses[5][0], abs=1e-5)
    # the last mask update (schedule step 4) came before update 6, in the resumed attempt, from the
    # stored values it restored from checkpoint 4 (the uninterrupted run's masks: the test below)
    before, after = checkpoint_masks(spec.run, 5), checkpoint_masks(spec.run, 6)
    assert before.keys() == after.keys()
    pruned = lambda masks: sum(int((~m).sum()) for m in masks.values())  # noqa: E731
    assert pruned(after) > pruned(before)


def test_student_export_has_the_target_sparsity(killed_and_resumed):
    spec, result, _, _ = killed_and_resumed
    for auto in (AutoModelForPreTraining, AutoModelForMaskedLM, AutoModelForQuestionAnswering):
        auto.from_pretrained(result.model_dir)
    model = AutoModelForPreTraining.from_pretrained(result.model_dir)
    masks = checkpoint_masks(spec.run, 6)
    assert len(masks) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output per layer + pooler
    for name, keep in masks.items():
        w = model.get_parameter(name)
        assert torch.equal(w != 0, keep), name  # zeros exactly where the masks say
        assert (w == 0).float().mean().item() == pytest.approx(0.9, abs=1.0 / w.numel() + 1e-9), name
    assert (model.get_parameter("bert.embeddings.word_embeddings.weight") == 0).float().mean() < 0.01
    assert {"sparsity.json", "sparsity.png"} <= set(os.listdir(result.model_dir))
    with open(os.path.join(result.model_dir, "sparsity.json")) as f:
        assert json.load(f)["global_sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_student_metrics_and_frozen_teacher(killed_and_resumed):
    spec, result, _, _ = killed_and_resumed
    assert {"loss", "loss/hard", "loss/kd", "lr", "val/loss", "val/mlm_acc", "val/nsp_acc"} <= set(result.metrics)
    assert result.metrics["sparsity/global"] == pytest.approx(0.9, abs=1e-3)
    assert any(k.startswith("sparsity/layer/bert.encoder.layer.1.") for k in result.metrics)
    assert result.metrics["loss/kd"] > 0
    assert result.metrics["loss"] == pytest.approx(0.5 * result.metrics["loss/hard"] + 0.5 * result.metrics["loss/kd"])
    summary = read_record(TrainSummary, spec.run.summary, spec.run.stage)
    assert summary.teacher_frozen is True  # no grads, no optimizer state on the teacher


def test_student_logs_each_loss_term_and_the_mask_updates(killed_and_resumed):
    from tests.pipelines import reference_pruneofa as ref

    spec, _, _, _ = killed_and_resumed
    with open(spec.run.metrics) as f:
        train = {r["step"]: r for r in map(json.loads, f) if "loss/ce_mlm" in r}  # the resumed attempt's last
    assert sorted(train) == list(range(1, 7))
    for step, r in train.items():
        assert r["loss"] == pytest.approx(0.5 * (r["loss/ce_mlm"] + r["loss/ce_nsp"])
                                          + 0.5 * (r["loss/kd_mlm"] + r["loss/kd_nsp"]), rel=1e-5)
        assert r["lr"] == pytest.approx(1e-3 * ref.lr_multiplier(step - 1, 1, 6, 0, 4, 2), rel=1e-9)
    assert sorted(s for s, r in train.items() if "masks/regrown" in r) == [2, 4, 6]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, killed_and_resumed):
    """The same student stage, same seed and data, run start to finish without interruption."""
    run_dir = str(tmp_path_factory.mktemp("student-uninterrupted"))
    make_preprocess(run_dir)
    make_teacher_export(run_dir)
    spec = student_spec(run_dir, checkpoint_every=1)
    return spec, run_training(spec, echo=False)


def test_killed_run_matches_an_uninterrupted_run(killed_and_resumed, uninterrupted):
    """Every step's loss to 1e-5, the final masks exactly, the exported weights to 1e-5."""
    spec, result, _, _ = killed_and_resumed
    ref_spec, ref_result = uninterrupted
    resumed, reference = read_losses(spec.run.metrics), read_losses(ref_spec.run.metrics)
    assert sorted(reference) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step][-1] == pytest.approx(reference[step][0], abs=1e-5), step
    final = checkpoint_masks(spec.run, 6)
    ref_masks = checkpoint_masks(ref_spec.run, 6)
    assert final.keys() == ref_masks.keys() and all(torch.equal(final[k], ref_masks[k]) for k in final)
    ours, theirs = (load_file(os.path.join(r.model_dir, "model.safetensors")) for r in (result, ref_result))
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5, rtol=0) for k in ours)
