"""What a pretraining worker reads, taken from the preprocess stage's typed output record: the
tokenizer, the masking contract (turned into collator settings), and each split's shards with their
row counts. The worker and the tests build batches through `PretrainingInputs`, so what the tests
check is what training uses."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipelines.data.collator import CollatorSettings
from pipelines.data.masking import MaskingContract
from workers.run_layout import RunLayout
from workers.stage_outputs import PreprocessOutput, read_output
from workers.train.streaming import VALIDATION_SEED, StreamingBatches, ValidationBatches


def saved_vocab(folder: str) -> Any:
    """The WordPiece vocabulary in a saved fast tokenizer's `tokenizer.json`, or None (absent/other kind):
    cheap enough to compare two folders before any worker starts."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        vocab = json.load(f).get("model", {}).get("vocab")
    return vocab if isinstance(vocab, dict) else None


def load_tokenizer(tokenizer_dir: str) -> PreTrainedTokenizerBase:
    if not os.path.isdir(tokenizer_dir):
        raise ValueError(f"tokenizer folder {tokenizer_dir!r} is missing: run the preprocess stage first")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def collator_settings(tokenizer: PreTrainedTokenizerBase, contract: MaskingContract) -> CollatorSettings:
    """The batch-time settings that honour the preprocess stage's masking contract."""
    for token in ("pad_token_id", "mask_token_id"):
        if getattr(tokenizer, token) is None:
            raise ValueError(f"tokenizer has no {token.replace('_id', '')}: MLM pretraining needs one")
    return CollatorSettings(pad_id=tokenizer.pad_token_id, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                            special_ids=frozenset(tokenizer.all_special_ids), masking=contract.kind,
                            masked_lm_prob=contract.masked_lm_prob,
                            max_predictions_per_seq=contract.max_predictions_per_seq)


def split_files(layout: RunLayout, record: PreprocessOutput, split: str) -> tuple[list[str], list[int]]:
    """The split's shard files and their row counts, as the record lists them."""
    shards = record.splits[split].shards  # type: ignore[index]
    return [layout.shard(split, s.name) for s in shards], [s.rows for s in shards]


def check_shards(layout: RunLayout, record: PreprocessOutput) -> None:
    """Every shard the record lists exists with the row count it records (footers only: no data read);
    with static masking, each shard's first row group carries masks that fit its input_ids."""
    for split in record.splits:
        files, counts = split_files(layout, record, split)
        for path, rows in zip(files, counts):
            if not os.path.isfile(path):
                raise ValueError(f"{path} is missing (listed in {layout.manifest('preprocess')}): redo the "
                                 "preprocess stage")
            meta = pq.ParquetFile(path).metadata
            if meta.num_rows != rows:
                raise ValueError(f"{path} has {meta.num_rows} rows, {layout.manifest('preprocess')} records {rows}: "
                                 "the shard changed since it was written; redo the preprocess stage")
            if record.masking.kind == "static" and meta.num_row_groups:
                check_static_masks(path, pq.ParquetFile(path).read_row_group(0))


def check_static_masks(path: str, table: pa.Table) -> None:
    """Static masks that do not fit their rows: named by file and field before any step trains on them."""
    lengths = table.column("input_ids").combine_chunks().value_lengths().to_numpy()
    positions = table.column("masked_lm_positions").to_pylist()
    ids = table.column("masked_lm_ids").to_pylist()
    for row, (n, pos, lab) in enumerate(zip(lengths, positions, ids)):
        if not pos:
            raise ValueError(f"{path} row {row}: masked_lm_positions is empty, but the manifest says masking: "
                             "static (the shard was not masked when it was written)")
        if len(pos) != len(lab):
            raise ValueError(f"{path} row {row}: masked_lm_positions has {len(pos)} entries, masked_lm_ids "
                             f"{len(lab)}")
        if max(pos) >= n or min(pos) < 0:
            raise ValueError(f"{path} row {row}: masked_lm_positions {pos} point outside input_ids of length {n}")


class PretrainingInputs:
    """One rank's view of the preprocessed data: the record, tokenizer, collator settings, its stream of
    training micro-batches (in the global order) and its share of the validation samples."""

    def __init__(self, layout: RunLayout, seed: int, rank: int, world: int, global_batch: int, micro_batch: int,
                 eval_samples: int, record: Optional[PreprocessOutput] = None) -> None:
        self.record = record or read_output(layout, "preprocess", PreprocessOutput)
        self.tokenizer = load_tokenizer(layout.path(self.record.tokenizer))
        self.settings = collator_settings(self.tokenizer, self.record.masking)
        self.train = StreamingBatches(layout, self.record, self.settings, seed, rank, world, global_batch, micro_batch)
        self.validation = ValidationBatches(layout, self.record, self.settings, VALIDATION_SEED, rank, world,
                                            eval_samples, micro_batch)
