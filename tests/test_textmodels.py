"""The locally built stand-in BERT is a deterministic function of its texts and seed."""
import hashlib

from pipeline.text.models import build_tiny_bert, train_wordpiece_tokenizer

TEXTS = [
    "No acute cardiopulmonary process. Heart size is normal.",
    "Moderate right pleural effusion. No pneumothorax.",
    "Possible left lower lobe consolidation. Cardiomegaly is stable.",
    "No pneumothorax. Endotracheal tube terminates 4 cm above the carina.",
] * 3


def _digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in ("vocab.txt", "model.safetensors", "tokenizer.json")}


def test_two_builds_are_identical(tmp_path):
    a = build_tiny_bert(TEXTS, tmp_path / "a", hidden=32, layers=1, heads=2, vocab_size=80)
    b = build_tiny_bert(list(reversed(TEXTS)), tmp_path / "b", hidden=32, layers=1, heads=2, vocab_size=80)
    assert _digest(a) == _digest(b)


def test_vocabulary_spells_any_word_and_keeps_frequent_words_whole():
    tok = train_wordpiece_tokenizer(TEXTS, vocab_size=60)
    assert tok.tokenize("pneumothorax") == ["pneumothorax"]  # frequent: one token
    pieces = tok.tokenize("pleuritic")  # unseen word made of seen letters: spelled, never [UNK]
    assert "[UNK]" not in pieces and len(pieces) > 1
    assert "".join(p.removeprefix("##") for p in pieces) == "pleuritic"
    assert len(tok) <= 60
