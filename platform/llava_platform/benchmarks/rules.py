"""The scoring rules of the benchmarks' official scripts, as pure functions on strings.

Each rule says which official script it follows; the table in ``jobs/README.md`` (The LLaVA-1.5
benchmarks) lists them per benchmark. Nothing here reads files or knows a benchmark's layout.

- ``evalai_answer``: EvalAI's answer processor, which LLaVA applies to every VQAv2 / VizWiz reply it
  submits and TextVQA's evaluator applies to both sides.
- ``vqav2_accuracy`` (the VQA challenge server's ``vqaEval.py``), ``vizwiz_accuracy`` (VizWiz's
  evaluator), ``textvqa_accuracy`` (LLaVA's ``m4c_evaluator.py``): the soft accuracy min(#matching
  annotators / 3, 1) averaged over the 10 leave-one-out subsets of the annotators, each normalising what
  its script normalises and nothing more.
- ``gqa_normalize``: LLaVA's conversion for the GQA evaluation script (strip final periods, lower-case),
  scored by exact match.
- ``pope_yes_no`` / ``mme_yes_no``: POPE's and MME's readings of a free-text reply as yes / no.
- ``letter_by_rules`` (VLMEvalKit's, for MMBench) and ``scienceqa_letter`` (LLaVA's): the
  option letter of a multiple-choice reply, or ``None`` where the rules cannot tell (for MMBench a judge
  may then be asked).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont":
    "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent":
    "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll":
    "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt":
    "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam":
    "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve":
    "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock":
    "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd":
    "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve":
    "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere":
    "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've":
    "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre":
    "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres":
    "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl":
    "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont":
    "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve":
    "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve":
    "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
"""The VQA evaluation's contraction table as published (GT-Vision-Lab's ``vqaEval.py``, the same in LLaVA's
``m4c_evaluator.py``), quirks kept: "Im"/"Ive" never match a lower-cased word; "somebody'd" -> "somebodyd"."""

VIZWIZ_CONTRACTIONS = {key.replace("'", "\u2019"): value.replace("'", "\u2019")
                       for key, value in VQA_CONTRACTIONS.items()}
"""VizWiz's evaluator writes the table's apostrophes as U+2019, so "dont" becomes "don\u2019t"."""

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")  # the official "(?!<=\d)(\.)(?!\d)": its "(?!<=" is a lookahead, a no-op
_PERIODS_REMOVED = 32  # the official call passes re.UNICODE (32) as sub()'s count
_COMMA_IN_NUMBER = re.compile(r"\d,\d")  # vqaEval.py / VizWiz: "(\d)(\,)(\d)"


def _punctuation(text: str) -> str:
    # A punctuation mark next to a space, or any text with a comma inside a number, loses the mark; elsewhere
    # it becomes a space ("black-and-white" -> "black and white"); then up to 32 periods not before a digit go.
    glued = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        out = out.replace(mark, "" if glued or f"{mark} " in text or f" {mark}" in text else " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def _digits_articles(text: str, contractions: Mapping[str, str] = VQA_CONTRACTIONS) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(contractions.get(word, word) for word in words if word not in ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def evalai_answer(reply: str) -> str:
    """EvalAI's answer processor (LLaVA's ``m4c_evaluator.EvalAIAnswerProcessor``): what LLaVA submits for
    VQAv2 and VizWiz and what TextVQA compares.

    Lower-case; "," and "?" removed, "'s" split off ("it's" -> "it 's"); newlines and tabs to spaces;
    punctuation removed or turned into spaces; periods not before a digit removed; number words zero..ten
    (and "none") to digits; articles dropped; the contraction table ("dont" -> "don't").

    >>> evalai_answer("Two dogs.")
    '2 dogs'
    """
    text = reply.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return _digits_articles(_punctuation(_clean(text)))


def _leave_one_out(reply: str, answers: Sequence[str]) -> float:
    # For each annotator i, the others that gave the reply count m_i; the score is mean(min(m_i / 3, 1)).
    matches = sum(answer == reply for answer in answers)
    return sum(min((matches - (answer == reply)) / 3, 1.0) for answer in answers) / len(answers)


def _needs_answers(annotators: Sequence[str]) -> None:
    if not annotators:
        raise ValueError("VQA accuracy needs the annotators' answers; got none")


_MARKS = r"\\;/\"`\[\](){}<>@=+_\-,?!"  # PUNCTUATION as a regular-expression class body
_MARKS_AT_START = re.compile(rf"\A[ {_MARKS}]+(?=[a-zA-Z0-9 ])")
_MARKS_AT_END = re.compile(rf"(?<=[a-zA-Z0-9 ])[ {_MARKS}]+\Z")
_COMMAS_IN_NUMBER = re.compile(r"(?<=\d),+(?=\d)")
_MARK_BESIDE_MARK = re.compile(rf"(?<=[ {_MARKS}])[{_MARKS}]|[{_MARKS}](?=[ {_MARKS}])")
_MARK_IN_WORD = re.compile(rf"(?<=[a-zA-Z])[{_MARKS}](?=[a-zA-Z])")


def _server_punctuation(text: str) -> str:
    # The VQA challenge server's punctuation rule: marks (and spaces) at either end removed, commas inside a
    # number removed, a mark beside a space or another mark -> a space, runs of spaces -> one, a mark
    # between two letters -> a space; then up to 32 periods not before a digit removed.
    text = _MARKS_AT_END.sub("", _MARKS_AT_START.sub("", text))
    text = re.sub(" +", " ", _MARK_BESIDE_MARK.sub(" ", _COMMAS_IN_NUMBER.sub("", text)))
    return _PERIOD.sub("", _MARK_IN_WORD.sub(" ", text), count=_PERIODS_REMOVED)


def vqav2_accuracy(reply: str, annotators: Sequence[str]) -> float:
    """VQAv2's accuracy as LLaVA-1.5's figure was made: the reply as LLaVA submits it (``evalai_answer``),
    scored by the VQA challenge's evaluation server (EvalAI's ``vqaEval.py``, Cloud-CV/VQA-Challenge): the
    reply cleaned and normalised again (punctuation by the server's rule, number words, articles,
    contractions); the annotators' answers compared as written, or with only the punctuation rule where
    they disagree; then min(#other matching annotators / 3, 1) averaged over the annotators. So "2"
    scores 0 against annotators' "Two" and "it's" scores 0 against "it's" (submitted as "it 's").

    Raises:
        ValueError: no annotator answers.
    """
    _needs_answers(annotators)
    submitted = _digits_articles(_server_punctuation(_clean(evalai_answer(reply))))
    answers = list(annotators) if len(set(annotators)) == 1 else [_server_punctuation(a) for a in annotators]
    return _leave_one_out(submitted, answers)


def vizwiz_accuracy(reply: str, annotators: Sequence[str]) -> float:
    """VizWiz's accuracy: the reply as LLaVA submits it (``evalai_answer``), normalised again by VizWiz's
    evaluator (its contraction table has U+2019 apostrophes), against the annotators' answers as written
    (never normalised: "2" scores 0 against "Two"); min(#other matching / 3, 1) averaged over annotators.

    Raises:
        ValueError: no annotator answers.
    """
    _needs_answers(annotators)
    submitted = _digits_articles(_punctuation(_clean(evalai_answer(reply))), VIZWIZ_CONTRACTIONS)
    return _leave_one_out(submitted, list(annotators))


def textvqa_accuracy(reply: str, annotators: Sequence[str]) -> float:
    """TextVQA's accuracy (LLaVA's ``m4c_evaluator.TextVQAAccuracyEvaluator``): ``evalai_answer`` on the reply
    and on every annotator answer, then min(#other matching / 3, 1) averaged over the annotators.

    Raises:
        ValueError: no annotator answers.
    """
    _needs_answers(annotators)
    return _leave_one_out(evalai_answer(reply), [evalai_answer(answer) for answer in annotators])


def gqa_normalize(answer: str) -> str:
    """What GQA's exact match compares (LLaVA's ``convert_gqa_for_eval``): the reply without its final
    periods, lower-cased, nothing else (" yes" and "the dog" stay wrong)."""
    return answer.rstrip(".").lower()


def pope_yes_no(reply: str) -> str:
    """POPE's reading of a reply (``eval_pope.py``): its first sentence, commas removed, split on spaces;
    ``no`` where a word is "No", "no" or "not", else ``yes`` (an empty reply too)."""
    first = reply.split(".")[0] if "." in reply else reply
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def mme_yes_no(reply: str) -> str | None:
    """MME's reading of a reply (``calculation.py``): "yes" if the lower-cased reply's first 4 characters hold
    "yes", else "no" if they hold "no" ("know", "nothing" read as no), else ``None`` (always wrong; an
    empty reply, "  yes" with two leading spaces). The script's exact-match branch never fires: it reads
    each line with its newline."""
    prefix = reply.lower()[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return None


def exact_letter(reply: str, answer: str) -> bool:
    """SEED-Bench's rule (LLaVA's ``convert_seed_for_submission.py``): the reply is the answer's letter, as is
    ("A." and " A" are wrong)."""
    return reply == answer


_OPTION_MARKS = re.compile(r"[.()\[\],:;!*#{}]")
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
"""Replies VLMEvalKit reads as the answer ``Z`` (none of the options)."""
NONE_OF_THEM = "Z"


def letter_by_rules(reply: str, options: dict[str, str]) -> str | None:
    """The option a free-text reply picks, by VLMEvalKit's rules for MMBench (``can_infer`` in
    ``vlmeval/utils/matching_util.py`` before August 2025, the rules of the leaderboard LLaVA-1.5 was
    scored on), or ``None``.

    1. A refusal (``REFUSALS``) -> ``"Z"``: none of the options (counted wrong, no judge asked).
    2. The reply's words, with ``.()[],:;!*#{}`` turned into spaces: exactly one of them is an option
       letter (upper case, as given) -> that letter ("B", "(B) red", "The answer is B."); no option letter
       but the word "Z" -> ``"Z"``.
    3. Else exactly one option's text occurs in the lower-cased reply -> its letter ("It is red").
    4. Else ``None``: no letter, or more than one; a judge may be asked (``jobs.score --judge-url``).

    Args:
        options: letter -> option text, e.g. ``{"A": "red", "B": "blue"}``.
    """
    if "Failed to obtain answer via API" not in reply and any(refusal in reply for refusal in REFUSALS):
        return NONE_OF_THEM
    words = _OPTION_MARKS.sub(" ", reply).split()
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    if not letters and NONE_OF_THEM in words:
        return NONE_OF_THEM
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
