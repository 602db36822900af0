"""Fine-tuning on real Ray Train + DeepSpeed (2 gloo workers): pattern lock, distillation from a task
teacher, task metrics, Hugging Face export, and resume after a worker failure. The sparse model is a
tiny BERT with 90% of its encoder weights pruned by the sparsity core; the data are the real movie
reviews gensim ships (classification) and a SQuAD-format file the test writes (extractive QA)."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
from transformers import AutoModelForPreTraining, AutoModelForQuestionAnswering, AutoModelForSequenceClassification
from transformers import BertConfig

from pipelines.data.paths import resolve_source_path
from pipelines.data.tokenizer import train_wordpiece
from pipelines.finetune.config import FinetuneTrainConfig, TaskConfig, TaskData
from pipelines.finetune.plan import task_train_config
from pipelines.finetune.qat import load_int8
from pipelines.sparsity.config import PruningConfig, ScheduleConfig
from pipelines.sparsity.masks import compute_masks
from pipelines.sparsity.report import prunable_weights
from tests.conftest import GENSIM_POLARITY
from workers.run_layout import RunLayout
from workers.run_records import TrainSummary, read_record
from workers.train.spec import FaultInjection

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

PRUNING = PruningConfig(schedule=ScheduleConfig(final_sparsity=0.9))


def _sentences() -> list[str]:
    with open(resolve_source_path(GENSIM_POLARITY), encoding="cp1252") as f:  # the file is Windows-1252
        return [line.split(" ", 1)[1].strip() for line in f if " " in line]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A dense 'teacher' export and its 90%-sparse 'student', both with a tokenizer."""
    root = tmp_path_factory.mktemp("ft-models")
    tok_dir = str(root / "tok")
    tok = train_wordpiece(_sentences(), vocab_size=800, lowercase=True, out_dir=tok_dir, model_max_length=64)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForPreTraining.from_config(config)
    out = {}
    for name in ("teacher", "student"):
        if name == "student":
            weights = prunable_weights(model, PRUNING)
            masks = compute_masks(weights, 0.9, PRUNING)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if pname in masks:
                        p.mul_(masks[pname].to(p.dtype))
        folder = str(root / name)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = folder
    return out


def _zero_pattern(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name (without the architecture prefix) -> zero mask of every prunable weight."""
    return {n.split(".", 1)[1]: (w == 0) for n, w in prunable_weights(model, PRUNING).items()}


def _spec(task: TaskConfig, role: str, run_name: str, layout: RunLayout, init: str, **kw):
    from workers.finetune.spec import FinetuneSpec

    train_rows = kw.pop("train_rows")
    base = FinetuneTrainConfig(num_workers=2, zero_stage=2, checkpoint_every=2, keep_checkpoints=2,
                               max_failures=kw.pop("max_failures", 0), retry_backoff_s=0.2)
    return FinetuneSpec(task=task, role=role, layout=layout, run_name=run_name, init_model=init,
                        train=task_train_config(base, task, train_rows, role), seed=7, progress=False, **kw)


def test_sentiment_locked_student_with_kd_and_resume(ray_local, models, tmp_path) -> None:
    from workers.finetune.prepare import prepare_task
    from workers.finetune.run import run_finetune

    task = TaskConfig(name="polarity", data=TaskData(path=GENSIM_POLARITY), max_seq_length=48, epochs=1,
                      learning_rate=2e-3, global_batch_size=16, micro_batch_size=8)
    layout = RunLayout.open(str(tmp_path / "run"))
    stats = prepare_task(task, models["student"], layout.task_data(task.name))
    assert stats["train"]["examples"] == 160 and stats["validation"]["examples"] == 40
    n = stats["train"]["features"]

    # the task teacher: the dense model with a classification head (the stage fine-tunes it first;
    # tests/integration/test_pipeline_tiny.py covers that run)
    teacher_dir = str(tmp_path / "task-teacher")
    AutoModelForSequenceClassification.from_pretrained(models["teacher"], num_labels=2).save_pretrained(teacher_dir)
    assert _spec(task, "teacher", "teacher", layout, models["teacher"], train_rows=n).pruning is None

    student = _spec(task, "student", "seed-7", layout, models["student"], train_rows=n,
                    teacher_dir=teacher_dir, max_failures=1,
                    fault=FaultInjection(step=3, marker=str(tmp_path / "fault")))
    result = run_finetune(student, echo=False)
    assert result.final_step == student.train.max_steps == 10  # 160 rows / 16 per step, one epoch
    assert result.start_steps == [0, 2]  # the injected failure at step 3 resumed from the step-2 checkpoint
    assert {"loss/hard", "loss/kd", "eval/accuracy"} <= set(result.metrics)
    with open(student.run.metrics) as f:
        logged = [json.loads(line) for line in f]
    assert logged and not any("data/masked_fraction" in r for r in logged)  # no MLM in fine-tuning: not logged
    evaluated = [r for r in logged if "sparsity/target" in r]
    assert evaluated and all(abs(r["sparsity/target"] - 0.9) < 1e-3 for r in evaluated)  # the locked level, not 0

    tuned = AutoModelForSequenceClassification.from_pretrained(student.run.model)
    before = _zero_pattern(AutoModelForPreTraining.from_pretrained(models["student"]))
    after = _zero_pattern(tuned)
    assert before.keys() == after.keys() and len(after) == 2 * 6 + 1  # 6 Linear per layer + pooler
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name}: zero pattern changed"
    with open(os.path.join(student.run.model, "sparsity.json")) as f:
        assert abs(json.load(f)["global_sparsity"] - 0.9) < 1e-3
    assert any(p.abs().sum() > 0 for n, p in tuned.named_parameters() if n.startswith("classifier."))


def test_a_teacher_with_another_vocabulary_or_label_count_is_refused(models, tmp_path) -> None:
    from workers.finetune.prepare import prepare_task
    from workers.finetune.run import finetune_preflight

    task = TaskConfig(name="polarity", max_seq_length=48, global_batch_size=16, micro_batch_size=8)
    layout = RunLayout.open(str(tmp_path / "run"))
    n = prepare_task(task, models["student"], layout.task_data(task.name))["train"]["features"]
    other = str(tmp_path / "other")
    train_wordpiece(["completely different words here"] * 5, vocab_size=60, lowercase=True, out_dir=other,
                    model_max_length=64)
    spec = _spec(task, "student", "seed-7", layout, models["student"], train_rows=n, teacher_dir=other)
    with pytest.raises(ValueError, match="another vocabulary"):
        finetune_preflight(spec)
    three = str(tmp_path / "three-labels")  # a teacher fine-tuned on another task
    AutoModelForSequenceClassification.from_pretrained(models["teacher"], num_labels=3).save_pretrained(three)
    spec.teacher_dir = three
    with pytest.raises(ValueError, match="has 3 labels, the task 2"):
        finetune_preflight(spec)


def _qa_file(path: str, n: int, seed: int) -> None:
    """SQuAD v1.1 schema: contexts of several review sentences, the answer a span of one of them."""
    sents = _sentences()
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            picked = rng.sample(sents, 4)
            context = " ".join(picked)
            words = picked[2].split()
            answer = " ".join(words[:3])
            start = context.index(picked[2])
            f.write(json.dumps({"id": f"q{seed}-{i}", "title": "reviews", "context": context,
                                "question": "what does the third sentence start with ?",
                                "answers": {"text": [answer], "answer_start": [start]}}) + "\n")


def test_extractive_qa_windows_and_exports_a_locked_qa_model(ray_local, models, tmp_path) -> None:
    from workers.finetune.prepare import prepare_task
    from workers.finetune.run import run_finetune

    _qa_file(str(tmp_path / "train.jsonl"), 48, seed=1)
    _qa_file(str(tmp_path / "dev.jsonl"), 16, seed=2)
    task = TaskConfig(name="squad", data=TaskData(files={"train": str(tmp_path / "train.jsonl"),
                                                          "validation": str(tmp_path / "dev.jsonl")}),
                      max_seq_length=48, doc_stride=16, max_query_length=16, epochs=1, learning_rate=2e-3,
                      global_batch_size=16, micro_batch_size=8)
    layout = RunLayout.open(str(tmp_path / "run"))
    stats = prepare_task(task, models["student"], layout.task_data(task.name))
    assert stats["train"]["windowed_examples"] > 0  # contexts longer than one window were split, not dropped
    spec = _spec(task, "student", "seed-7", layout, models["student"],
                 train_rows=stats["train"]["features"], qat=True)
    result = run_finetune(spec, echo=False)
    assert 0.0 <= result.metrics["eval/exact_match"] <= result.metrics["eval/f1"] <= 100.0
    quant = read_record(TrainSummary, spec.run.summary, spec.run.stage).quantization
    assert quant["quantized_layers"] == 12 and quant["pattern_zeros_kept"] == quant["pattern_zeros"] > 0
    assert quant["int8_bytes"] < quant["fp32_bytes"] and quant["quantized_weight_sparsity"] >= 0.9 - 1e-3
    dequant = load_int8(spec.run.model)
    tuned_state = AutoModelForQuestionAnswering.from_pretrained(spec.run.model).state_dict()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(dequant[name] == 0, tuned_state[name] == 0)  # int8 zeros are exactly the pattern
    tuned = AutoModelForQuestionAnswering.from_pretrained(spec.run.model)
    before = _zero_pattern(AutoModelForPreTraining.from_pretrained(models["student"]))
    after = _zero_pattern(tuned)
    assert len(after) == 2 * 6 and set(after) < set(before)  # the QA model has no pooler
    assert all(torch.equal(before[n], after[n]) for n in after)
