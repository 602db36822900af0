"""Training honours the preprocess stage's masking contract. The data come from the preprocess
stage's own producers and the batches are built the way the pretraining worker builds them
(`PretrainingInputs` from the typed output record, the rank's share, the step's micro-batches), so
what is checked here is what training uses."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.data.collator import IGNORE_INDEX, mlm_counts
from tests.workers.train_fixture import make_preprocess
from workers.stage_outputs import ManifestError, PreprocessOutput, read_output
from workers.train.inputs import PretrainingInputs, check_shards, split_files
from workers.train.streaming import GlobalCursor


def _inputs(layout, samples: int = 16, micro: int = 8) -> PretrainingInputs:
    return PretrainingInputs(layout, seed=7, rank=0, world=1, global_batch=samples, micro_batch=micro, eval_samples=8)


def _step_batches(layout, steps: int = 3, samples: int = 16, micro: int = 8) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of the first steps, exactly as the pretraining worker gets them."""
    inputs = _inputs(layout, samples, micro)
    out, cursor = [], GlobalCursor()
    for _ in range(steps):
        out += inputs.train.step_batches(cursor)
        cursor = inputs.train.advance(cursor)
    return out


def _fraction(batches) -> float:
    targets, maskable = map(sum, zip(*(mlm_counts(b) for b in batches)))
    return targets / maskable


def test_long_sequences_get_bert_s_15_percent(tmp_path) -> None:
    """The model-card recipes: length 512 with max_predictions_per_seq 77 (not the default 20)."""
    layout = make_preprocess(str(tmp_path), documents=40, max_len=512, max_predictions_per_seq=77, lines=(90, 120))
    record = read_output(layout, "preprocess", PreprocessOutput)
    assert record.masking.max_predictions_per_seq == 77 and record.max_seq_length == 512
    batches = _step_batches(layout, steps=2, samples=8, micro=4)
    assert max(b["input_ids"].shape[1] for b in batches) > 400  # long instances really are there
    assert 0.14 <= _fraction(batches) <= 0.16
    assert max(int((b["labels"] != IGNORE_INDEX).sum(1).max()) for b in batches) > 20  # past the old cap


def test_the_cap_per_sequence_is_the_contract_s(tmp_path) -> None:
    layout = make_preprocess(str(tmp_path), documents=60, max_len=128, max_predictions_per_seq=5, lines=(20, 30))
    batches = _step_batches(layout)
    per_seq = torch.cat([(b["labels"] != IGNORE_INDEX).sum(1) for b in batches])
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches])
    # BERT's rule, capped by the contract: min(cap, max(1, round(15% of the length)))
    expected = torch.clamp(torch.round(lengths * 0.15), min=1, max=5)
    assert torch.equal(per_seq, expected.long()) and int(per_seq.max()) == 5
    assert _fraction(batches) < 0.8 * 0.15  # the cap bites: well below the uncapped 15%


def test_static_masks_are_the_stored_ones_and_never_masked_again(tmp_path) -> None:
    layout = make_preprocess(str(tmp_path), documents=60, masking="static", dupe_factor=2)
    record = read_output(layout, "preprocess", PreprocessOutput)
    assert record.masking.kind == "static" and record.masking.copies == 2
    inputs = _inputs(layout, 16, 16)
    batch = inputs.train.step_batches(GlobalCursor())[0]
    rows = inputs.train.order.rows_at(0, 0, 16)
    stored = pa.concat_tables(inputs.train.files.read(i) for i in range(len(inputs.train.files.paths)))
    for i, row in enumerate(stored.take(pa.array(rows)).to_pylist()):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]  # the stored (masked) ids, as they are
        labelled = torch.nonzero(batch["labels"][i] != IGNORE_INDEX).flatten().tolist()
        assert labelled == row["masked_lm_positions"]
        assert batch["labels"][i, labelled].tolist() == row["masked_lm_ids"]


def test_static_masks_that_do_not_fit_their_rows_are_named(tmp_path) -> None:
    layout = make_preprocess(str(tmp_path), documents=30, masking="static")
    record = read_output(layout, "preprocess", PreprocessOutput)
    path = split_files(layout, record, "train")[0][0]
    table = pq.read_table(path)
    positions = table.column("masked_lm_positions").to_pylist()
    positions[0] = [p + 1000 for p in positions[0]]
    pq.write_table(table.set_column(table.schema.get_field_index("masked_lm_positions"), "masked_lm_positions",
                                    pa.array(positions, type=pa.list_(pa.int32()))), path)
    with pytest.raises(ValueError, match=r"shard-.*row 0: masked_lm_positions .* outside input_ids"):
        check_shards(layout, record)


def test_a_shard_whose_row_count_changed_is_named(tmp_path) -> None:
    layout = make_preprocess(str(tmp_path), documents=30)
    record = read_output(layout, "preprocess", PreprocessOutput)
    path = split_files(layout, record, "train")[0][0]
    pq.write_table(pq.read_table(path).slice(0, 3), path)
    with pytest.raises(ValueError, match=r"has 3 rows, .*manifest.json records \d+"):
        check_shards(layout, record)


def test_a_manifest_missing_a_field_names_it_and_the_stage_to_redo(tmp_path) -> None:
    layout = make_preprocess(str(tmp_path), documents=30)
    path = layout.manifest("preprocess")
    manifest = json.load(open(path))
    del manifest["output"]["masking"]["max_predictions_per_seq"]
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ManifestError, match=r"field output\.masking\.max_predictions_per_seq is missing; "
                                            r"redo the preprocess stage"):
        read_output(layout, "preprocess", PreprocessOutput)
    manifest["format"] = 1  # a manifest of the previous pofa, without typed records
    json.dump(manifest, open(path, "w"))
    with pytest.raises(ManifestError, match="another pofa version"):
        read_output(layout, "preprocess", PreprocessOutput)
