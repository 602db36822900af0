"""Seeds aggregate to means with every seed kept, and the report's table follows the model card."""
from orchestrator.stages.finetune import aggregate
from orchestrator.stages.results_table import results_table, seed_table
from pipelines.finetune.published import PUBLISHED


def test_mean_over_seeds_keeps_each_seed() -> None:
    out = aggregate({1: {"exact_match": 80.0, "f1": 88.0}, 2: {"exact_match": 82.0, "f1": 89.0}})
    assert out["exact_match"] == 81.0 and out["f1"] == 88.5
    assert out["seeds"] == {"1": {"exact_match": 80.0, "f1": 88.0}, "2": {"exact_match": 82.0, "f1": 89.0}}


def test_table_in_model_card_layout_with_published_row() -> None:
    name = "bert-base-uncased-sparse-90-unstructured-pruneofa"
    results = {"squad": {"exact_match": 79.5, "f1": 87.0, "teacher": {"exact_match": 81.0, "f1": 88.5}},
               "mnli": {"m_accuracy": 81.0, "mm_accuracy": 82.25}}
    table = results_table(results, name, PUBLISHED[name], seeds=2).splitlines()
    assert table[0] == ("| model | SQuAD v1.1 EM/F1 | MNLI-m | MNLI-mm | QQP acc/F1 | QNLI | SST-2 |")
    assert table[2].startswith(f"| {name} (this run, mean of 2 seeds) | 79.50/87.00 | 81.00 | 82.25 | – | – | – |")
    assert table[3] == "| dense task teacher (this run) | 81.00/88.50 | – | – | – | – | – |"
    assert table[4] == f"| {name} (published) | 79.83/87.25 | 81.45 | 82.43 | 90.93/87.72 | 89.07 | 90.88 |"


def test_table_without_published_figures_and_seed_rows() -> None:
    results = {"polarity": {"accuracy": 70.0, "seeds": {"42": {"accuracy": 65.0}, "43": {"accuracy": 75.0}},
                            "sparsity": {"42": 0.9, "43": 0.9}}}
    table = results_table(results, "tiny", None, seeds=2)
    assert "Polarity (gensim)" in table and "(published)" not in table and "| 70.00 |" in table
    rows = seed_table(results).splitlines()
    assert rows[2] == "| polarity | 42 | accuracy=65.00 | 0.9000 |" and len(rows) == 4
