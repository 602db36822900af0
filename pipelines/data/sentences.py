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
