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


def test_a_finished_run_says_its_result_on_the_console() -> None:
    from orchestrator.run_graph import Node
    from orchestrator.stages.finetune import _announce
    from workers import console_lines
    from workers.stage_outputs import FinetuneRunOutput

    said: list[str] = []
    undo = console_lines.install(said.append)
    try:
        done = Node("polarity/seed-42", run=lambda: None, started=100.0, finished=145.0,
                    result=FinetuneRunOutput(name="seed-42", seed=42, model="finetune/polarity/seed-42/model",
                                             final_step=40, metrics={"loss": 0.6, "accuracy": 70.0}))
        _announce("finished", done, {"running": 1, "done": 2, "total": 3})
        squad = Node("squad/seed-1", run=lambda: None, started=0.0, finished=9.0,
                     result=FinetuneRunOutput(name="seed-1", seed=1, model="m", final_step=1,
                                              metrics={"exact_match": 80.0, "f1": 88.25}))
        _announce("finished", squad, {"running": 0, "done": 3, "total": 3})
    finally:
        undo()
    assert said == ["[finetune] polarity/seed-42 finished in 45s: accuracy 70.00 (1 running, 2/3 done)",
                    "[finetune] squad/seed-1 finished in 9s: f1 88.25 (0 running, 3/3 done)"]
