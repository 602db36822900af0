"""The report stage's inference section: the table (a row that could not be measured says why), the
MLflow metric names, and a disabled section leaving no stale inference.json."""
from orchestrator.recipe.load import load_recipe
from orchestrator.stages.inference_section import inference_metrics, render_inference, run_inference
from workers.run_layout import RunLayout

REPORT = {"runtime": "onnxruntime", "runtime_version": "1.32.0", "provider": "CPUExecutionProvider", "seq_len": 128,
          "latency_batch": 1, "throughput_batch": 32,
          "machine": {"cpu": "Example", "kernels": ["avx2", "avx512_vnni"], "explanation": "no speed-up here."},
          "models": [{"name": "teacher", "graph": "encoder", "sparsity": 0.0, "throughput_seq_s": 100.0,
                      "throughput_speedup": 1.0, "latency_ms": 2.0, "latency_speedup": 1.0, "max_abs_diff": 1e-6,
                      "safetensors_bytes": 4_000_000, "sparse_bytes": 3_000_000, "error": None},
                     {"name": "polarity/seed-42", "sparsity": 0.9, "safetensors_bytes": 4_000_000,
                      "sparse_bytes": 1_000_000, "latency_speedup": None, "throughput_speedup": None,
                      "error": "cannot convert: DispatchError: no | ONNX function"}]}


def test_the_table_has_a_row_per_model_and_says_why_one_is_missing() -> None:
    text = "\n".join(render_inference(REPORT))
    assert text.startswith("## Inference")
    assert "| teacher | encoder | 0.000 | 100.0 | 1.00 | 2.00 | 1.00 | 4.00 | 3.00 | max abs diff" in text
    assert ("| polarity/seed-42 | – | 0.900 | – | – | – | – | 4.00 | 1.00 | **not measured**: cannot convert: "
            "DispatchError: no \\| ONNX function |") in text
    assert "CPU kernels: avx2, avx512_vnni. no speed-up here." in text
    assert render_inference(None) == []


def test_a_rows_spread_is_shown_and_an_unsteady_ratio_is_flagged() -> None:
    busy = {**REPORT, "cores": 2, "load_avg": [9.5, 12.25],
            "models": [REPORT["models"][0],
                       {"name": "student", "graph": "encoder", "sparsity": 0.9, "throughput_seq_s": 80.0,
                        "throughput_speedup": 0.8, "throughput_speedup_range": [0.47, 1.78], "latency_ms": 1.5,
                        "latency_speedup": 1.33, "latency_speedup_range": [1.2, 1.4], "max_abs_diff": 2e-6,
                        "unsteady": "x dense ranged 0.47-1.78 over the timing rounds", "error": None}]}
    text = "\n".join(render_inference(busy))
    assert "| student | encoder | 0.900 | 80.0 | 0.80 (0.47–1.78) | 1.50 | 1.33 (1.20–1.40) |" in text
    assert "**unsteady**: x dense ranged 0.47-1.78 over the timing rounds; max abs diff vs PyTorch 2.0e-06" in text
    assert "Load average 9.5 → 12.2 on 2 cores while measuring. **The machine was busier than its cores" in text
    quiet = "\n".join(render_inference({**busy, "load_avg": [0.5, 0.7]}))
    assert "Load average 0.5 → 0.7 on 2 cores while measuring." in quiet and "busier than its cores" not in quiet


def test_metrics_are_named_per_model_and_skip_what_was_not_measured() -> None:
    metrics = inference_metrics(REPORT)
    assert metrics["inference.teacher.latency_ms"] == 2.0 and metrics["inference.teacher.sparse_mb"] == 3.0
    assert metrics["inference.polarity.seed-42.sparse_mb"] == 1.0
    assert "inference.polarity.seed-42.latency_ms" not in metrics


def test_a_disabled_section_removes_an_older_inference_json(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "inference.json").write_text("{}")
    recipe = load_recipe("tiny", ["report.inference.enabled=false"])
    assert run_inference(recipe, layout, {}, tracker=None) is None
    assert not (tmp_path / "report" / "inference.json").exists()
