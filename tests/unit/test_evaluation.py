"""Answer scoring."""

import pytest

from llava_platform.evaluation import extract_choice, is_correct


@pytest.mark.parametrize("text, letter", [("B", "B"), ("B.", "B"), ("(c) blue", "C"), ("The answer is D.", "D"),
                                          (" a", "A"), ("red", None), ("", None)])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_normalised_exact_match():
    assert is_correct("The Circle.", "circle", "short") and is_correct("Two.", "2", "short")  # the VQA normalisation
    assert is_correct("Red.", "red", "short") and not is_correct("Red square", "red", "short")
    assert is_correct("B. red", "B", "mc") and not is_correct("A", "B", "mc")
