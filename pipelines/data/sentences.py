"""Sentence segmentation with sentencex (Wikimedia's maintained segmenter; rule-based, no download)."""
from __future__ import annotations

import sentencex


def split_sentences(text: str, language: str = "en") -> list[str]:
    """Sentences of every paragraph, in order; paragraph breaks always end a sentence."""
    out: list[str] = []
    for paragraph in text.split("\n\n"):
        for sentence in sentencex.segment(language, paragraph):
            sentence = sentence.strip()
            if sentence:
                out.append(sentence)
    return out


def split_lines(text: str) -> list[str]:
    """Each non-blank line as one sentence (BERT's input format): the author's split is kept as is."""
    # Only "\n" ends a line, as in the file reader: U+2028, \x0c and the like stay inside their sentence.
    return [line for line in (raw.strip() for raw in text.split("\n")) if line]
