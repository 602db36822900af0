"""The pretraining data path without a cluster: global batch k is the same samples with the same
masks on any number of workers and any micro-batch size, memory stays within the windows in use,
and the loss of a global batch does not depend on how it is split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.data.collator import IGNORE_INDEX
from pipelines.models.build import build_pretraining_model
from pipelines.models.config import BertInit, ModelConfig
from pipelines.training.losses import GlobalNorm, pretraining_loss
from tests.workers.train_fixture import make_preprocess
from workers.stage_outputs import PreprocessOutput, read_output
from workers.train.inputs import PretrainingInputs
from workers.train.streaming import GlobalCursor, ValidationBatches, counts_of

GLOBAL = 16


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return make_preprocess(str(tmp_path_factory.mktemp("run")), documents=90)


def _rank_inputs(layout, world: int, micro: int) -> list[PretrainingInputs]:
    return [PretrainingInputs(layout, seed=5, rank=r, world=world, global_batch=GLOBAL, micro_batch=micro,
                              eval_samples=40) for r in range(world)]


def _samples(batch: dict[str, torch.Tensor]) -> list[tuple]:
    """Each sample as (its input ids, its labels), padding stripped: comparable across paddings."""
    out = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        out.append((tuple(ids[:n].tolist()), tuple(labels[:n].tolist())))
    return out


def test_a_global_batch_is_the_same_samples_and_masks_on_any_worker_count(layout) -> None:
    reference = _rank_inputs(layout, 1, GLOBAL)[0].train
    cursor = GlobalCursor()
    for step in range(reference.steps_per_epoch + 2):  # across the epoch boundary too
        expected = _samples(reference.step_batches(cursor)[0])
        for world, micro in ((2, 4), (4, 2), (2, 8)):
            ranks = _rank_inputs(layout, world, micro)
            got = [s for inputs in ranks for b in inputs.train.step_batches(cursor) for s in _samples(b)]
            assert got == expected, (step, world, micro)  # the same samples, in order, with the same masks
        cursor = reference.advance(cursor)
    assert cursor.epoch == 1


def test_memory_stays_within_the_windows_in_use(tmp_path) -> None:
    from workers.train.streaming import StreamingBatches

    layout = make_preprocess(str(tmp_path), documents=80, shards=8)
    inputs = _rank_inputs(layout, 1, 4)[0]
    stream = StreamingBatches(layout, inputs.record, inputs.settings, 5, 1, 2, GLOBAL, 4, window_groups=2)
    cursor, held, read = GlobalCursor(), [], set()
    for _ in range(3 * stream.steps_per_epoch):
        stream.step_batches(cursor)
        cursor = stream.advance(cursor)
        held.append(len(stream._tables))
        read |= set(stream._tables)
    assert len(read) == 8  # it did go through every shard...
    assert max(held) <= 2 * 2  # ...holding at most the current window and the next one


def test_validation_is_the_same_samples_on_any_worker_count(layout) -> None:
    record = read_output(layout, "preprocess", PreprocessOutput)
    settings = _rank_inputs(layout, 1, 4)[0].settings

    def samples(world: int) -> list[tuple]:
        out = []
        for rank in range(world):
            val = ValidationBatches(layout, record, settings, 5, rank, world, samples=30, micro_batch=4)
            passes = val.batches()
            assert len(passes) == -(-(-(-30 // world)) // 4)  # every rank runs the same passes
            out += [s for batch, real in passes if real for s in _samples(batch)]
        return out

    assert samples(1) == samples(3) and len(samples(1)) == 30


def test_runs_with_other_seeds_are_validated_on_the_same_masks(layout) -> None:
    """The teacher and students of other seeds read the same data: their val/* metrics compare only when
    the validation samples carry the same masked tokens, while their training masks differ."""
    def inputs(seed: int) -> PretrainingInputs:
        return PretrainingInputs(layout, seed=seed, rank=0, world=1, global_batch=GLOBAL, micro_batch=8,
                                 eval_samples=24)

    first, second = inputs(1), inputs(2)
    val = [[s for batch, real in i.validation.batches() if real for s in _samples(batch)] for i in (first, second)]
    assert val[0] == val[1] and len(val[0]) == 24
    assert any(lbl != IGNORE_INDEX for _, labels in val[0] for lbl in labels)  # dynamic masks were drawn
    train = [[s for b in i.train.step_batches(GlobalCursor()) for s in _samples(b)] for i in (first, second)]
    assert train[0] != train[1]


def test_the_loss_of_a_global_batch_does_not_depend_on_how_it_is_split(layout) -> None:
    inputs = _rank_inputs(layout, 1, GLOBAL)[0]
    model = build_pretraining_model(ModelConfig(init=BertInit(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                              intermediate_size=64)),
                                    vocab_size=len(inputs.tokenizer), pad_token_id=inputs.tokenizer.pad_token_id,
                                    seed=0).eval()
    whole = inputs.train.step_batches(GlobalCursor())
    targets, tokens, sequences = counts_of(whole).tolist()

    def loss_of(batches: list[dict[str, torch.Tensor]]) -> float:
        norm = GlobalNorm(targets, tokens, sequences)
        with torch.no_grad():
            return sum(float(pretraining_loss(model(**{k: b[k] for k in ("input_ids", "token_type_ids",
                                                                          "attention_mask")}), b, norm)[0])
                       for b in batches)

    split = [b for inputs_r in _rank_inputs(layout, 4, 2) for b in inputs_r.train.step_batches(GlobalCursor())]
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in split) == targets
    assert loss_of(split) == pytest.approx(loss_of(whole), rel=1e-5)
    assert np.isfinite(loss_of(whole))
