"""The built-in model-card recipes hold the values their comments cite, validate offline, and match
the published table. Constants below are taken from the sources (IntelLabs/Model-Compression-Research-Package
research/prune-once-for-all/*.sh, the language-modeling pruning config, the QA/GLUE example READMEs, the
Prune OFA results table); a recipe that drifts from them fails here."""
import socket
import subprocess
import sys
from importlib import resources

import pytest

from orchestrator.recipe.load import builtin_recipes, load_recipe
from pipelines.finetune.published import PUBLISHED, SOURCE
from pipelines.sparsity.schedules import is_mask_update_step, last_mask_update_step, target_sparsity

# name -> (model, target sparsity, mask kind, fine-tuned tasks)
GLUE_AND_SQUAD = ("squad", "mnli", "qqp", "qnli", "sst2")
ROWS = {
    "bert-base-uncased-sparse-80-1x4-block-pruneofa": ("bert-base-uncased", 0.80, "block", ("squad",)),
    "bert-base-uncased-sparse-85-unstructured-pruneofa": ("bert-base-uncased", 0.85, "unstructured", GLUE_AND_SQUAD),
    "bert-base-uncased-sparse-90-unstructured-pruneofa": ("bert-base-uncased", 0.90, "unstructured", GLUE_AND_SQUAD),
    "bert-large-uncased-sparse-90-unstructured-pruneofa": ("bert-large-uncased", 0.90, "unstructured", GLUE_AND_SQUAD),
    "distilbert-base-uncased-sparse-85-unstructured-pruneofa":
        ("distilbert-base-uncased", 0.85, "unstructured", GLUE_AND_SQUAD),
    "distilbert-base-uncased-sparse-90-unstructured-pruneofa":
        ("distilbert-base-uncased", 0.90, "unstructured", GLUE_AND_SQUAD),
}

# teacher_preparation.sh / student_pruning.sh
STEPS, GLOBAL_BATCH, WARMUP, WEIGHT_DECAY = 100_000, 256, 0.01, 0.01
HF_DEFAULT_LR = 5e-5  # the scripts pass no --learning_rate
# iterative_unstructured_magnitude_90_config.json
POLICY_BEGIN, POLICY_END, BEGIN_PRUNING, END_PRUNING, FREQUENCY = 0, 50_000, 0, 80_000, 1_000
# run_mlm.py defaults / tokenizer.model_max_length
MAX_SEQ, SHORT_SEQ_PROB, VALIDATION = 512, 0.1, 0.05
# intel/neural-compressor prune_once_for_all READMEs (question-answering, text-classification), stage 1;
# the dense task teachers as MCR's question-answering / text-classification README commands
SQUAD = dict(max_seq_length=384, doc_stride=128, epochs=8, global_batch_size=12, learning_rate=1.5e-4,
             warmup_ratio=0.0, weight_decay=0.0, teacher_epochs=2, teacher_learning_rate=HF_DEFAULT_LR)
GLUE = dict(max_seq_length=128, epochs=9, global_batch_size=32, learning_rate=1e-4, warmup_ratio=0.0,
            weight_decay=0.0, teacher_epochs=3, teacher_learning_rate=HF_DEFAULT_LR)
DISTILBERT_SST2_LR = 1.5e-4  # intel-extension-for-transformers DistilBERT 90% SST-2 example
METRICS = {"squad": {"exact_match", "f1"}, "mnli": {"m_accuracy", "mm_accuracy"}, "qqp": {"accuracy", "f1"},
           "qnli": {"accuracy"}, "sst2": {"accuracy"}}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the hub (or anything else) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during recipe validation: {args!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def recipes():
    return {name: load_recipe(name, []) for name in ROWS}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_validates_offline_with_name_model_and_stages(name, no_network):
    r = load_recipe(name, [])
    model, _, _, _ = ROWS[name]
    assert r.name == name and r.description
    assert r.stages == ["preprocess", "teacher", "student", "finetune", "report"]
    assert r.model.name == model and r.preprocess.tokenizer.name == model


@pytest.mark.parametrize("name", sorted(ROWS))
def test_corpus_and_data_settings(name, recipes):
    p = recipes[name].preprocess
    assert (p.source.kind, p.source.name, p.source.config) == ("hf_dataset", "wikimedia/wikipedia", "20231101.en")
    assert (p.max_seq_length, p.short_seq_prob, p.validation_fraction, p.masking) == (
        MAX_SEQ, SHORT_SEQ_PROB, VALIDATION, "dynamic")
    # the reference masks 15% of tokens with no cap: pofa's cap must not bind at full length
    assert p.max_predictions_per_seq >= round(p.masked_lm_prob * p.max_seq_length)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_teacher_and_student_training_as_the_scripts(name, recipes):
    r = recipes[name]
    for stage in (r.teacher, r.student):
        assert (stage.max_steps, stage.global_batch_size, stage.learning_rate, stage.warmup_ratio,
                stage.weight_decay) == (STEPS, GLOBAL_BATCH, HF_DEFAULT_LR, WARMUP, WEIGHT_DECAY)
        assert stage.num_workers * stage.micro_batch_size * stage.grad_accum_steps == GLOBAL_BATCH


@pytest.mark.parametrize("name", sorted(ROWS))
def test_pruning_schedule_targets_and_mask_steps(name, recipes):
    _, target, mask_kind, _ = ROWS[name]
    student = recipes[name].student
    sched = student.pruning.schedule
    assert (sched.kind, sched.policy_begin_step, sched.policy_end_step, sched.begin_pruning_step,
            sched.end_pruning_step, sched.pruning_frequency) == (
        "cubic", POLICY_BEGIN, POLICY_END, BEGIN_PRUNING, END_PRUNING, FREQUENCY)
    assert target_sparsity(sched, 0) == 0.0
    assert target_sparsity(sched, POLICY_END) == pytest.approx(target)
    assert target_sparsity(sched, student.max_steps) == pytest.approx(target)
    # halfway through the policy the cubic is at 1 - 0.5**3 = 87.5% of the way
    assert target_sparsity(sched, POLICY_END // 2) == pytest.approx(target * 0.875)
    assert is_mask_update_step(sched, BEGIN_PRUNING) and not is_mask_update_step(sched, BEGIN_PRUNING + 1)
    assert last_mask_update_step(sched) == END_PRUNING
    assert not is_mask_update_step(sched, END_PRUNING + FREQUENCY)
    assert student.pruning.mask.kind == mask_kind and student.pruning.allocation == "uniform"
    if mask_kind == "block":
        assert tuple(student.pruning.mask.block_shape) == (1, 4)
    assert student.pruning.lr_rewind
    d = student.distillation
    assert (d.hard_weight, d.kd_weight, d.temperature) == (0.5, 0.5, 2.0)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_finetune_tasks_as_the_reference_examples(name, recipes):
    model, _, _, tasks = ROWS[name]
    f = recipes[name].finetune
    assert tuple(t.name for t in f.tasks) == tasks
    assert f.model is None and f.teacher_model == model  # sparse student; dense original as task teacher
    assert f.distill and f.lock_pattern and len(f.seeds) == 2  # mean of two seeds
    assert (f.distillation.hard_weight, f.distillation.kd_weight, f.distillation.temperature) == (0.5, 0.5, 2.0)
    for t in f.tasks:
        expected = dict(SQUAD if t.name == "squad" else GLUE)
        if model.startswith("distilbert") and t.name == "sst2":
            expected["learning_rate"] = DISTILBERT_SST2_LR
        assert {k: getattr(t, k) for k in expected} == expected, t.name


def test_published_table_matches_recipes(recipes):
    assert "arXiv:2111.05754" in SOURCE
    assert set(PUBLISHED) == set(ROWS)
    for name, r in recipes.items():
        assert set(PUBLISHED[name]) == {t.name for t in r.finetune.tasks}, name
        for task, metrics in PUBLISHED[name].items():
            assert set(metrics) == METRICS[task], (name, task)
            assert all(50.0 < v < 100.0 for v in metrics.values()), (name, task)
    assert PUBLISHED["bert-base-uncased-sparse-90-unstructured-pruneofa"]["squad"] == {"exact_match": 79.83, "f1": 87.25}
    assert PUBLISHED["bert-base-uncased-sparse-80-1x4-block-pruneofa"]["squad"] == {"exact_match": 81.29, "f1": 88.47}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_value_line_cites_a_source(name):
    text = (resources.files("orchestrator.builtin_recipes") / f"{name}.yaml").read_text()
    for line in text.splitlines():
        code = line.split("#", 1)[0].rstrip()
        if code and not code.endswith(":"):  # a value, not a section header
            assert "#" in line, f"{name}: no source comment on {line.strip()!r}"


def test_pofa_recipes_lists_them():
    assert set(ROWS) <= set(builtin_recipes())
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "recipes"], capture_output=True, text=True,
                         check=True).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(ROWS) | {"tiny"} <= listed
