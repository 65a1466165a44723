"""The scoring rules of the benchmarks' official scripts, as pure functions on strings.

Each rule says which official script it follows; the table in ``jobs/README.md`` (The LLaVA-1.5
benchmarks) lists them per benchmark. Nothing here reads files or knows a benchmark's layout.

- ``vqa_normalize`` / ``vqa_accuracy``: the VQA answer normalisation (EvalAI's answer processor, used by
  the VQAv2 / VizWiz evaluation servers and by LLaVA's TextVQA evaluator) and the soft accuracy
  min(#matching annotators / 3, 1) averaged over the 10 leave-one-out subsets of the annotators.
- ``gqa_normalize``: LLaVA's conversion for the GQA evaluation script (strip a final period, lower-case),
  scored by exact match.
- ``pope_yes_no`` / ``mme_yes_no``: POPE's and MME's readings of a free-text reply as yes / no.
- ``letter_by_rules`` (VLMEvalKit's, for MMBench) and ``scienceqa_letter`` (LLaVA's): the
  option letter of a multiple-choice reply, or ``None`` where the rules cannot tell (for MMBench a judge
  may then be asked).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import combinations

_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _spellings(word: str) -> set[str]:
    """``word`` with any non-empty subset of its apostrophes left out ("couldn't've" -> "couldntve",
    "couldn'tve", "couldnt've"): the misspellings annotators typed, each mapped back to ``word``."""
    positions = [i for i, char in enumerate(word) if char == "'"]
    found = set()
    for size in range(1, len(positions) + 1):
        for dropped in combinations(positions, size):
            found.add("".join(char for i, char in enumerate(word) if i not in dropped))
    return found


CONTRACTIONS = {spelling: word for word in _CONTRACTED for spelling in _spellings(word) if spelling != word}
"""Apostrophe-less spellings -> the contraction ("dont" -> "don't", "whats" -> "what's")."""

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("2." -> "2", "3.5" stays)
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")  # "1,000"


def _punctuation(text: str) -> str:
    # A punctuation mark next to a space, or any text with a thousands comma, loses the mark; elsewhere it
    # becomes a space ("black-and-white" -> "black and white", "yes, it is" -> "yes it is").
    glued = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if glued or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def vqa_normalize(answer: str) -> str:
    """The VQA evaluation's normal form of an answer.

    Lower-case; "," and "?" removed and "'s" split off; newlines and tabs to spaces; punctuation removed
    (or turned into spaces, see ``_punctuation``); periods not followed by a digit removed; number
    words zero..ten (and "none") to digits; articles dropped; contractions restored ("dont" -> "don't").

    >>> vqa_normalize("Two dogs.")
    '2 dogs'
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, annotators: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers (10 in VQAv2, VizWiz, TextVQA).

    For each annotator i, the other annotators that gave the (normalised) predicted answer count
    ``m_i``; the score is the mean over i of min(m_i / 3, 1). So 3 or more matching annotators out of 10
    give 1.0 and 1 matching gives 0.3.

    Raises:
        ValueError: no annotator answers.
    """
    if not annotators:
        raise ValueError("vqa_accuracy needs the annotators' answers; got none")
    predicted = vqa_normalize(prediction)
    answers = [vqa_normalize(answer) for answer in annotators]
    matches = sum(answer == predicted for answer in answers)
    # leaving annotator i out removes one match when i gave the predicted answer
    per_subset = [min((matches - (answer == predicted)) / 3, 1.0) for answer in answers]
    return sum(per_subset) / len(per_subset)


def gqa_normalize(answer: str) -> str:
    """What GQA's exact match compares (LLaVA's ``convert_gqa_for_eval``): the reply without a final period,
    lower-cased; the gold answers are lower-case words already."""
    return answer.strip().rstrip(".").lower()


def pope_yes_no(reply: str) -> str:
    """POPE's reading of a reply (``eval_pope.py``): its first sentence, commas removed, split on spaces;
    ``no`` where a word is "No", "no" or "not", else ``yes`` (an empty reply too)."""
    first = reply.split(".")[0] if "." in reply else reply
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def mme_yes_no(reply: str) -> str | None:
    """MME's reading of a reply (``calculation.py``): the lower-cased reply if it is "yes" or "no", else
    "yes"/"no" if its first 4 characters hold one (checked in that order), else ``None`` (always wrong)."""
    text = reply.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return None


_OPTION_MARKS = re.compile(r"[.()\[\],:;!*#{}]")


def letter_by_rules(reply: str, options: dict[str, str]) -> str | None:
    """The option a free-text reply picks, by VLMEvalKit's rules (MMBench), or ``None``.

    1. The reply's words, with ``.()[],:;!*#{}`` turned into spaces: exactly one of them is an option
       letter (upper case, as given) -> that letter ("B", "(B) red", "The answer is B.").
    2. Else (no letter, or several) exactly one option's text occurs in the lower-cased reply -> its letter
       ("It is red").
    3. Else ``None``: no letter, or more than one; a judge may be asked (``jobs.score --judge-url``).

    Args:
        options: letter -> option text, e.g. ``{"A": "red", "B": "blue"}``.
    """
    words = _OPTION_MARKS.sub(" ", reply).split()
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    lowered = reply.lower()
    texts = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return texts[0] if len(texts) == 1 else None


_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # LLaVA's pattern: "." is any character


def scienceqa_letter(reply: str, letters: Sequence[str]) -> str | None:
    """ScienceQA's reading of a reply (LLaVA's ``eval_science_qa.py``): the reply is a letter, or starts
    with "<letter>. ", or says "The answer is <letter>." exactly once; else ``None`` (counted wrong).

    Args:
        letters: the question's option letters, e.g. ``["A", "B", "C"]``.
    """
    letters = list(letters)
    if reply in letters:
        return reply
    if len(reply) >= 3 and reply[0] in letters and reply[1:3] == ". ":
        return reply[0]
    found = _ANSWER_IS.findall(reply)
    return found[0] if len(found) == 1 and found[0] in letters else None
