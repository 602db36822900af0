"""Recipes fail before any cluster work, with errors that name the key and the value."""
import subprocess
import sys

import pytest
import yaml

from orchestrator.recipe.load import RecipeError, builtin_recipes, load_recipe


def _problems(*overrides, recipe="tiny"):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, overrides)
    return "\n".join(info.value.problems)


def test_tiny_is_builtin_and_reads_gensims_dump():
    assert "tiny" in builtin_recipes()
    r = load_recipe("tiny")
    assert r.seed == 42 and r.preprocess.num_workers == 2
    (path,) = r.preprocess.source.files()
    assert "gensim" in path and path.endswith("-shortened.bz2")


@pytest.mark.parametrize("override,expected", [
    ("preprocess.validation_fraction=1.5", "preprocess.validation_fraction: Input should be less than 1 (got 1.5)"),
    ("preprocess.max_seq_length=4", "preprocess.max_seq_length: Input should be greater than or equal to 8 (got 4)"),
    ("preprocess.num_workers=two", "preprocess.num_workers: Input should be a valid integer"),
    ("preprocess.bogus=1", "preprocess.bogus: unknown key"),
    ("teacher.lerning_rate=0.1", "teacher.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
    ("student.pruning.schedule.final_sparsty=0.9",
     "student.pruning.schedule.final_sparsty: unknown key (did you mean 'final_sparsity'?)"),
    ("finetune.tasks.0.epoch=3", "finetune.tasks.0.epoch: unknown key (did you mean 'epochs'?)"),
    ("preprocess.source.path=/no/such/dump.xml.bz2", "preprocess.source: path '/no/such/dump.xml.bz2' matches no"),
    ("preprocess.masking=sometimes", "preprocess.masking: Input should be 'static' or 'dynamic'"),
    ("name=../../etc", "name: '../../etc' is not a safe run name"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("finetune.tasks.0.name=cola", "finetune.tasks.0.name: Input should be 'squad', 'mnli', 'qqp', 'qnli', 'sst2'"),
    ("finetune.tasks.0.data.path=/no/reviews.txt", "finetune.tasks.0.data: finetune.tasks[].data.path="),
    ("finetune.tasks.4.epochs=1", "finetune.tasks.4.epochs: '4' is not an index of a list of 1 item(s)"),
    ("finetune.seeds=[1, 1]", "finetune: finetune.seeds=[1, 1] repeats a seed"),
    ("finetune.tasks.0.global_batch_size=10", "finetune.tasks[polarity].global_batch_size=10 is not divisible"),
])
def test_bad_values_name_the_key(override, expected):
    assert expected in _problems(override)


def test_set_values_are_yaml_scalars():
    r = load_recipe("tiny", ["preprocess.short_seq_prob=0.2", "preprocess.masking=static", "seed=7",
                             "preprocess.source.max_documents=null"])
    assert r.preprocess.short_seq_prob == 0.2 and r.preprocess.masking == "static" and r.seed == 7
    assert _problems("preprocess") .startswith("'preprocess': expected KEY=VALUE")


def test_set_reaches_list_items():
    r = load_recipe("tiny", ["finetune.tasks.0.epochs=2", "finetune.seeds=[7]"])
    assert r.finetune.tasks[0].epochs == 2.0 and r.finetune.seeds == [7]


def test_yaml_file_recipe_and_validate_cli(tmp_path):
    doc = yaml.safe_load(open(load_recipe.__globals__["resources"].files("orchestrator.builtin_recipes") / "tiny.yaml"))
    doc["name"] = "mine"
    doc["preprocess"]["num_workers"] = 1
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(path), "--set",
                          "preprocess.max_seq_length=64"], capture_output=True, text=True, check=True).stdout
    resolved = yaml.safe_load(out)
    assert resolved["name"] == "mine" and resolved["preprocess"]["max_seq_length"] == 64
    assert resolved["preprocess"]["short_seq_prob"] == 0.1  # defaults are filled in
    bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", "tiny", "--set", "preprocess.x=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "preprocess.x: unknown key" in bad.stderr


def test_unknown_recipe_lists_builtins():
    assert "built-in: " in _problems(recipe="no-such-recipe") and "tiny" in _problems(recipe="no-such-recipe")


def test_a_finetune_only_recipe_needs_no_preprocess_section(tmp_path):
    """Fine-tuning any sparse model (hub name or folder) without the pretraining stages."""
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({"name": "ft", "stages": ["finetune", "report"],
                                    "finetune": {"model": "Intel/bert-base-uncased-sparse-90-unstructured-pruneofa",
                                                 "teacher_model": "bert-base-uncased", "tasks": [{"name": "sst2"}]}}))
    r = load_recipe(str(path))
    assert r.preprocess is None and r.finetune.tasks[0].name == "sst2"
    path.write_text(yaml.safe_dump({"name": "ft", "stages": ["preprocess"]}))
    assert "preprocess: required when stages include 'preprocess'" in _problems(recipe=str(path))


def test_max_concurrent_runs_below_one_is_named():
    with pytest.raises(RecipeError, match=r"finetune.max_concurrent_runs: .*greater than or equal to 1"):
        load_recipe("tiny", ["finetune.max_concurrent_runs=0"])
    assert load_recipe("tiny", ["finetune.max_concurrent_runs=2"]).finetune.max_concurrent_runs == 2
