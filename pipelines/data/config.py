"""Typed recipe section for the preprocess stage (`preprocess:` in a recipe)."""
from __future__ import annotations

import glob
import os
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.config_keys import operational
from pipelines.data.paths import resolve_source_path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Strict):
    """Where documents come from.

    kind:
      wikipedia_xml  a raw MediaWiki dump (`pages-articles*.xml[.bz2]`); `path` may be a glob of dump files
      hf_dataset     a Hugging Face dataset by name/config (e.g. wikimedia/wikipedia, 20231101.en) or a local
                     dataset folder saved with `save_to_disk`
      jsonl/parquet  local files with a text column (optional id/title columns); `path` may be a glob
      text           plain text, one document per blank-line separated block
    read_unit_mb: how much of a file one reader task reads (bz2 dumps by their multistream index or their
      bzip2 blocks, uncompressed JSON Lines/text/XML by byte ranges aligned to records, Parquet by row
      groups; gzip and other compressed text files, and any file under `max_documents`, are one unit).
    sentence_per_line (text only): the BERT pretraining input format, one sentence per line and a blank line
      between documents; each line is kept as exactly one sentence. Default true for `text`; false = a
      block's lines are joined and split into sentences by the segmenter (sentencex). Other kinds are always
      split by the segmenter, so setting it true for them is an error.
    `path` accepts `pkg://<package>/<relative path>` for files shipped inside an installed package.
    """

    kind: Literal["wikipedia_xml", "hf_dataset", "jsonl", "parquet", "text"]
    path: Optional[str] = None
    name: Optional[str] = None
    config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    streaming: bool = True
    text_column: str = "text"
    id_column: Optional[str] = "id"
    title_column: Optional[str] = "title"
    max_documents: Optional[int] = Field(default=None, gt=0)
    sentence_per_line: Optional[bool] = None  # None: the kind's default (see `splits_lines`)
    # Stored (compressed) MB each reader task reads: one file is read by many readers at once. Changes no
    # output byte (shards are cut by the data, see pipelines/data/units.py); larger than a file: one unit.
    read_unit_mb: float = operational(32.0, gt=0)

    @model_validator(mode="after")
    def _check_sentence_per_line(self) -> "SourceConfig":
        if self.sentence_per_line and self.kind != "text":
            raise ValueError(f"sentence_per_line: only the text source reads one sentence per line; kind {self.kind} "
                             "is always split into sentences by the segmenter")
        return self

    @model_validator(mode="after")
    def _check_location(self) -> "SourceConfig":
        if self.kind == "hf_dataset":
            if not (self.name or self.path):
                raise ValueError("kind hf_dataset needs `name` (hub dataset) or `path` (local folder)")
            if self.path and not os.path.exists(resolve_source_path(self.path)):
                raise ValueError(f"path {self.path!r} does not exist")
            return self
        if not self.path:
            raise ValueError(f"path is required for kind {self.kind}")
        if not self.files():
            raise ValueError(f"path {self.path!r} matches no readable file")
        return self

    @property
    def splits_lines(self) -> bool:
        """Whether each line of a document is one sentence (the text kind's default, BERT's format)."""
        return self.kind == "text" and self.sentence_per_line is not False

    def files(self) -> list[str]:
        """The source files in a stable order (a glob expands sorted)."""
        resolved = resolve_source_path(self.path or "")
        if os.path.isdir(resolved):
            found = sorted(os.path.join(resolved, f) for f in os.listdir(resolved))
        else:
            found = sorted(glob.glob(resolved)) if glob.has_magic(resolved) else [resolved]
        return [f for f in found if os.path.isfile(f) and os.access(f, os.R_OK)]


class TokenizerConfig(_Strict):
    """`name`: a hub name or local path of a tokenizer; or `train`: a WordPiece tokenizer trained on the corpus."""

    name: Optional[str] = None
    train_vocab_size: int = Field(default=8000, ge=200, le=200_000)
    train_documents: int = Field(default=5000, gt=0)
    lowercase: bool = True

    @property
    def trains(self) -> bool:
        return self.name is None


class PreprocessConfig(_Strict):
    source: SourceConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    max_seq_length: int = Field(default=128, ge=8, le=8192)
    short_seq_prob: float = Field(default=0.1, ge=0.0, le=1.0)
    nsp_random_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    masking: Literal["static", "dynamic"] = "dynamic"
    masked_lm_prob: float = Field(default=0.15, gt=0.0, lt=1.0)
    max_predictions_per_seq: int = Field(default=20, ge=1)
    dupe_factor: int = Field(default=1, ge=1, le=100)
    validation_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    min_document_tokens: int = Field(default=8, ge=1)
    documents_per_shard: int = Field(default=2000, ge=1)
    num_workers: int = operational(2, ge=1)  # the output is byte-identical with any number of workers
    cpus_per_worker: float = operational(1.0, gt=0)
    language: str = "en"

    @field_validator("language")
    @classmethod
    def _lang(cls, v: str) -> str:
        if not v.isalpha() or len(v) > 8:
            raise ValueError(f"not a language code: {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "PreprocessConfig":
        if self.dupe_factor > 1 and self.masking == "dynamic":
            raise ValueError("dupe_factor: copies only make sense with masking: static (dynamic masks at batch time)")
        return self
