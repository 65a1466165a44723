"""Scoring of generated answers: VQA-style normalised exact match and multiple-choice letters."""

from __future__ import annotations

import re

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")
_LETTER = re.compile(r"^\s*\(?([A-Z])[\).:\s]|^\s*([A-Z])\s*$|answer is \(?([A-Z])\)?", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze spaces (VQA-style)."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_choice(text: str) -> str | None:
    """The option letter of a multiple-choice answer ("B", "B.", "(B) red", "The answer is B")."""
    match = _LETTER.search(text.strip())
    if not match:
        return None
    return next(group for group in match.groups() if group).upper()


def is_correct(prediction: str, gold: str, kind: str) -> bool:
    """``kind``: ``mc`` compares option letters, anything else normalised exact match."""
    if kind == "mc":
        return extract_choice(prediction) == gold.strip().upper()
    return normalize_answer(prediction) == normalize_answer(gold)
