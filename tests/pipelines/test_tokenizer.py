"""The offline demo's WordPiece tokenizer: learned from the corpus, the same on every run."""
from transformers import AutoTokenizer

from pipelines.data.tokenizer import build_wordpiece_vocab, train_wordpiece

TEXTS = ["The anarchists organised themselves in federations. Federations of workers organised strikes."] * 20 + [
    "Mathematicians proved theorems; the theorem was proved by induction."] * 10


def test_vocab_is_deterministic_and_sized():
    a = build_wordpiece_vocab(TEXTS, 120, lowercase=True)
    assert a == build_wordpiece_vocab(list(reversed(TEXTS)), 120, lowercase=True)
    assert len(a) == 120 and len(set(a)) == 120
    assert a[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_saved_tokenizer_loads_and_has_no_unknowns_on_its_corpus(tmp_path):
    train_wordpiece(TEXTS, 300, True, str(tmp_path), 128)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok(TEXTS[0])["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids
    assert "federations" in tok.tokenize(TEXTS[0])
