"""Model cards of a run's exports, read back with huggingface_hub's parser, and `pofa export`: the
folder loads with the Auto classes and carries the card; bad input writes nothing; `--push` reaches
the hub's API (a local stub that records what the real HfApi client sends)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huggingface_hub import ModelCard, metadata_load

from orchestrator.cli import main
from orchestrator.fingerprints import outputs_problem
from orchestrator.model_card.records import RunRecords
from orchestrator.model_card.write import write_run_cards, write_stage_cards
from tests.orchestrator.card_run import SEED, make_card_run
from workers.stage_outputs import load_manifest

EXPORTS = {"teacher": "teacher/model", "student": "student/model",
           "polarity/teacher": "finetune/polarity/teacher/model",
           f"polarity/seed-{SEED}": f"finetune/polarity/seed-{SEED}/model", "polarity/model": "finetune/polarity/model"}


@pytest.fixture(scope="module")
def card_run(tmp_path_factory):
    layout = make_card_run(str(tmp_path_factory.mktemp("card-run") / "run"))
    written = write_run_cards(RunRecords.read(layout))
    return layout, written


def _results(card: ModelCard) -> dict[tuple[str, str], float]:
    return {(r.dataset_type, r.metric_name): r.metric_value for r in card.data.eval_results or []}


def test_every_export_has_a_card_the_hub_parser_reads(card_run) -> None:
    layout, written = card_run
    assert sorted(layout.rel(p) for p in written) == sorted(f"{f}/README.md" for f in EXPORTS.values())
    for name, folder in EXPORTS.items():
        path = os.path.join(layout.root, folder, "README.md")
        card, meta = ModelCard.load(path), metadata_load(path)
        assert card.data.license == "apache-2.0" and card.data.language == ["en"], name
        assert card.data.library_name == "transformers" and "prune-once-for-all" in card.data.tags
        assert meta["model-index"][0]["name"] == f"tiny-{name.replace('/', '-')}"
        assert card.data.eval_results, name  # the model-index parsed back into results
        for section in ("## How to use", "## Method and recipe", "## Sparsity", "## Training data and preprocessing",
                        "## Results", "## Inference", "## Limitations"):
            assert section in card.text, (name, section)


def test_the_student_card_holds_its_sparsity_data_and_results(card_run) -> None:
    layout, _ = card_run
    card = ModelCard.load(os.path.join(layout.root, "student", "model", "README.md"))
    sparsity = json.load(open(os.path.join(layout.root, "student", "model", "sparsity.json")))
    assert card.data.pipeline_tag == "fill-mask"
    assert {"sparse", "pruning", "sparsity-90", "unstructured"} <= set(card.data.tags)
    results = _results(card)
    assert results[("wikipedia", "MLM accuracy")] == 0.25 and results[("wikipedia", "NSP accuracy")] == 0.6
    # the transfer result as Intel's cards give it: the task, fine-tuned with the pattern locked, mean of seeds
    assert results[("polarity", "accuracy (fine-tuned, pattern locked, mean of 1 seed)")] == 70.0
    text = card.text
    assert f"Global sparsity **{sparsity['global_sparsity']:.4f}**" in text and "unstructured magnitude" in text
    assert all(f"| {layer['name']} |" in text for layer in sparsity["layers"])  # per layer
    assert "90% train / 10% validation" in text and "Masking: dynamic, 15% of tokens" in text
    assert "| dense task teacher (this run) | 80.00 |" in text and "| tiny (this run, mean of 1 seed) | 70.00 |" in text
    assert "| student | 0.900 |" in text and "| teacher | 0.000 |" in text  # inference: the model and its dense one
    assert "AutoModelForPreTraining.from_pretrained('path/to/model')" in text


def test_fine_tuned_and_dense_cards(card_run) -> None:
    layout, _ = card_run
    seed = ModelCard.load(os.path.join(layout.root, EXPORTS[f"polarity/seed-{SEED}"], "README.md"))
    assert seed.data.pipeline_tag == "text-classification" and "polarity" in seed.data.tags
    assert _results(seed) == {("polarity", f"accuracy (seed {SEED})"): 70.0}
    assert "AutoModelForSequenceClassification" in seed.text and "pattern locked" in seed.text
    teacher = ModelCard.load(os.path.join(layout.root, "teacher", "model", "README.md"))
    assert "dense" in teacher.data.tags and "sparse" not in teacher.data.tags
    assert "Dense: no weight was pruned." in teacher.text
    task_teacher = ModelCard.load(os.path.join(layout.root, EXPORTS["polarity/teacher"], "README.md"))
    assert _results(task_teacher) == {("polarity", "accuracy (dense task teacher)"): 80.0}


def test_cards_are_no_stages_recorded_output(card_run) -> None:
    """Rewriting a card (the report does) leaves every stage's outputs as recorded: nothing is redone."""
    layout, _ = card_run
    for stage in ("teacher", "student", "finetune"):
        manifest = load_manifest(layout, stage)
        assert not any(rel.endswith("README.md") for rel in manifest.outputs)
        assert outputs_problem(layout, stage, manifest) is None


def test_stage_cards_cover_that_stage_only(card_run, tmp_path) -> None:
    layout, _ = card_run
    os.remove(os.path.join(layout.root, "teacher", "model", "README.md"))
    os.remove(os.path.join(layout.root, "student", "model", "README.md"))
    written = write_stage_cards(RunRecords.read(layout).recipe, layout, "teacher")
    assert [layout.rel(p) for p in written] == ["teacher/model/README.md"]
    assert not os.path.exists(os.path.join(layout.root, "student", "model", "README.md"))
    write_run_cards(RunRecords.read(layout))


@pytest.mark.parametrize("stage,auto", [("student", "AutoModelForPreTraining"), ("teacher", "AutoModelForPreTraining"),
                                        (f"finetune/polarity/{SEED}", "AutoModelForSequenceClassification")])
def test_export_writes_a_folder_the_auto_classes_load(card_run, tmp_path, capsys, stage, auto) -> None:
    import transformers

    layout, _ = card_run
    out = tmp_path / "export"
    assert main(["export", layout.root, "--stage", stage, "--to", str(out)]) == 0
    assert f"exported {stage} to {out}" in capsys.readouterr().out
    expected = {"config.json", "model.safetensors", "tokenizer_config.json", "sparsity.json", "README.md"}
    assert expected <= set(os.listdir(out))
    model = getattr(transformers, auto).from_pretrained(str(out))
    transformers.AutoTokenizer.from_pretrained(str(out))
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results and f"{auto}.from_pretrained({str(out)!r})" in card.text
    sparsity = json.load(open(out / "sparsity.json"))["global_sparsity"]
    assert sparsity == (0.0 if stage == "teacher" else pytest.approx(0.9, abs=1e-3))
    assert model.config.vocab_size == 100
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary sibling left


def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pofa: error: ")
    return err


def test_bad_input_is_one_line_and_writes_nothing(card_run, tmp_path, capsys, monkeypatch) -> None:
    import huggingface_hub.constants

    layout, _ = card_run
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    err = _refused(["export", layout.root, "--to", str(occupied)], capsys)
    assert "exists and is not empty" in err and os.listdir(occupied) == ["keep.txt"]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    err = _refused(["export", layout.root, "--to", str(tmp_path / "pushed"), "--push", "me/tiny"], capsys)
    assert "needs a Hugging Face token" in err and not (tmp_path / "pushed").exists()
    err = _refused(["export", layout.root, "--stage", "finetune/polarity/7", "--to", str(tmp_path / "x")], capsys)
    assert "no such export" in err and f"finetune/polarity/{SEED}" in err
    assert sorted(os.listdir(tmp_path)) == ["occupied"]


def test_export_of_an_unfinished_stage_is_refused(tmp_path, capsys) -> None:
    from orchestrator.recipe.load import load_recipe
    from orchestrator.rundir import RunDir
    from tests.workers.train_fixture import make_preprocess

    layout = make_preprocess(str(tmp_path / "run"), documents=30)
    RunDir(layout.root).write_recipe(load_recipe("tiny"))
    err = _refused(["export", layout.root, "--stage", "student", "--to", str(tmp_path / "out")], capsys)
    assert "the student stage of" in err and "has not finished" in err
    assert sorted(os.listdir(tmp_path)) == ["run"]


class _Hub(BaseHTTPRequestHandler):
    """The hub endpoints `create_repo` and `upload_folder` call, answering as the hub does; records each request."""

    calls: list[tuple[str, dict, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.calls.append((self.path, dict(self.headers), body))
        if self.path == "/api/repos/create":
            reply = {"url": f"http://{self.headers['Host']}/me/tiny-student", "name": "me/tiny-student"}
        elif self.path == "/api/validate-yaml":
            reply = {}
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            reply = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        elif "/commit/" in self.path:
            reply = {"commitUrl": f"http://{self.headers['Host']}/me/tiny-student/commit/abc123", "commitOid": "abc123"}
        else:
            self.send_response(404)
            self.end_headers()
            return
        _send_json(self, 200, reply)

    def log_message(self, *args: object) -> None:
        pass


def _send_json(handler: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def test_push_uploads_the_folder_through_the_hub_api(card_run, tmp_path) -> None:
    layout, _ = card_run
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_TOKEN": "hf_test_token",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    out = tmp_path / "tiny-student"
    try:
        res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "export", layout.root, "--to", str(out),
                              "--push", "me/tiny-student"], capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.shutdown()
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pushed it to me/tiny-student" in res.stdout
    paths = [c[0] for c in _Hub.calls]
    assert paths[0] == "/api/repos/create" and paths[-1] == "/api/models/me/tiny-student/commit/main"
    assert json.loads(_Hub.calls[0][2]) == {"name": "tiny-student", "organization": "me", "type": "model"}
    assert all(c[1].get("authorization", c[1].get("Authorization")) == "Bearer hf_test_token" for c in _Hub.calls)
    lines = [json.loads(line) for line in _Hub.calls[-1][2].splitlines()]
    files = {l["value"]["path"]: base64.b64decode(l["value"]["content"]) for l in lines if l["key"] == "file"}
    assert set(files) == set(os.listdir(out))  # the whole folder, as written
    assert files["README.md"] == (out / "README.md").read_bytes()
    assert "'me/tiny-student'" in files["README.md"].decode()  # the snippet loads it from the hub


def test_mlflow_records_the_cards_license_not_a_hub_address(card_run, tmp_path, monkeypatch, caplog) -> None:
    """MLflow's transformers flavour gets the export's card: no "Unable to find license information", and
    its LICENSE.txt states the card's license instead of https://huggingface.co/<local path>."""
    import logging

    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from orchestrator.tracking.models import log_hf_model

    layout, _ = card_run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("cards", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    folder = os.path.join(layout.root, "student", "model")
    with caplog.at_level(logging.WARNING):
        model_uri = log_hf_model(uri, run_id, folder, name="student", pip_requirements=[])
    assert "Unable to find license information" not in caplog.text
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    local = download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "logged"))
    license_text = open(os.path.join(local, "LICENSE.txt")).read()
    assert "License: apache-2.0" in license_text and "huggingface.co" not in license_text and folder not in license_text
    card_yaml = open(os.path.join(local, "model_card_data.yaml")).read()
    assert "license: apache-2.0" in card_yaml and "model-index" in card_yaml
    assert open(os.path.join(local, "model_card.md")).read() == ModelCard.load(os.path.join(folder, "README.md")).text


class _Refusing(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _send_json(self, 403, {"error": "You don't have the rights to create a model under the namespace \"me\""})

    def log_message(self, *args: object) -> None:
        pass


def test_a_refused_push_keeps_the_complete_folder_and_says_so(card_run, tmp_path, capsys, monkeypatch) -> None:
    import huggingface_hub.constants

    layout, _ = card_run
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "out"
    try:
        err = _refused(["export", layout.root, "--to", str(out), "--push", "me/tiny-student"], capsys)
    finally:
        server.shutdown()
    assert "push to me/tiny-student failed" in err and f"the folder {out} is complete" in err
    assert ModelCard.load(out / "README.md").data.license == "apache-2.0"


def test_a_model_card_recipe_names_its_hub_base_model_and_datasets(card_run) -> None:
    """The built-in recipes start from hub models and read hub data: the metadata links them (the tiny
    run's records, read under the BERT-Base 90% recipe)."""
    from orchestrator.model_card.exports import list_exports
    from orchestrator.model_card.write import build_card
    from orchestrator.recipe.load import load_recipe

    layout, _ = card_run
    records = RunRecords.read(layout, load_recipe("bert-base-uncased-sparse-90-unstructured-pruneofa"))
    exports = {e.name: e for e in list_exports(records)}
    student = build_card(records, exports["student"])
    assert student.data.base_model == "bert-base-uncased" and student.data.datasets == ["wikimedia/wikipedia"]
    mlm = next(r for r in student.data.eval_results if r.metric_name == "MLM accuracy")
    assert (mlm.dataset_type, mlm.dataset_config, mlm.dataset_split) == ("wikimedia/wikipedia", "20231101.en",
                                                                         "validation")
    assert "pofa run bert-base-uncased-sparse-90-unstructured-pruneofa" in student.text
    assert "| bert-base-uncased-sparse-90-unstructured-pruneofa (published) |" in student.text
