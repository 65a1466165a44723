"""Answer scoring."""

import pytest

from llava_platform.evaluation import extract_choice, is_correct, normalize_answer


@pytest.mark.parametrize("text, letter", [("B", "B"), ("B.", "B"), ("(c) blue", "C"), ("The answer is D.", "D"),
                                          (" a", "A"), ("red", None), ("", None)])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_normalised_exact_match():
    assert normalize_answer("The Circle.") == "circle"
    assert is_correct("Red.", "red", "short") and not is_correct("Red square", "red", "short")
    assert is_correct("B. red", "B", "mc") and not is_correct("A", "B", "mc")
