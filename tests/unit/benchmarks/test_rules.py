"""The benchmarks' official scoring rules (``llava_platform.benchmarks.rules``).

Every expected value here was worked out by hand from the rule the official script states, not copied
from the code's output; where the working is not obvious it is written next to the case. The official
scripts' own outputs on hundreds of generated cases are checked in ``test_official_fixtures.py``.
"""

import pytest

from llava_platform.benchmarks.rules import (
    evalai_answer,
    gqa_normalize,
    letter_by_rules,
    mme_yes_no,
    pope_yes_no,
    scienceqa_letter,
    textvqa_accuracy,
    vizwiz_accuracy,
    vqav2_accuracy,
)

# --- VQA normalisation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, normal", [
    ("Two", "2"),  # lower-case, then the number word
    ("the dog.", "dog"),  # final period (no digit after it) removed, article dropped
    ("dont", "don't"),
    ("don't", "don't"),  # already the contraction: unchanged ("'" is not a punctuation mark)
    ("1,000", "1000"),  # every "," removed first
    ("black-and-white", "black and white"),  # "-" touches no space anywhere -> becomes a space
    ("3.5", "3.5"),  # the period is followed by a digit: kept
    ("2.", "2"),  # the period is not followed by a digit: removed
    ("Yes?", "yes"),  # "?" removed
    ("  dog  ", "dog"),
])
def test_evalai_answer_basic(answer, normal):
    assert evalai_answer(answer) == normal


@pytest.mark.parametrize("answer, normal", [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("Three", "3"),
    ("ten", "10"),
    ("eleven", "eleven"),  # only none/zero..ten are mapped
    ("one hundred", "1 hundred"),  # word by word
    ("twenty two", "twenty 2"),
    ("someone", "someone"),  # whole words only, "one" inside a word stays
])
def test_evalai_answer_number_words(answer, normal):
    assert evalai_answer(answer) == normal


@pytest.mark.parametrize("answer, normal", [
    ("a cat", "cat"),
    ("an apple", "apple"),
    ("The Cat and the Dog", "cat and dog"),  # lower-cased before the articles are dropped
    ("the", ""),  # only an article: nothing left
    ("another", "another"),  # whole words only
    ("theater", "theater"),
])
def test_evalai_answer_articles(answer, normal):
    assert evalai_answer(answer) == normal


@pytest.mark.parametrize("answer, normal", [
    ("dont", "don't"),
    ("Dont", "don't"),  # lower-cased first
    ("isnt", "isn't"),
    ("wont", "won't"),
    ("couldntve", "couldntve"),  # both apostrophes left out: not in the official table
    ("im", "im"),  # the official table's key is "Im", which never meets a lower-cased word
    ("couldn'tve", "couldn't've"),  # the second one left out
    ("couldnt've", "couldn't've"),  # the first one left out
    ("couldn't've", "couldn't've"),
    ("whats", "what's"),
    ("i dont know", "i don't know"),  # word by word
])
def test_evalai_answer_contractions(answer, normal):
    assert evalai_answer(answer) == normal


@pytest.mark.parametrize("answer, normal", [
    # "'s" is split off before anything else: "dog's" -> "dog 's"; "'" itself is no punctuation mark
    ("dog's", "dog 's"),
    # "-" is next to a space somewhere in the text -> every "-" is removed: "a-b -c" -> "ab c"
    ("a-b -c", "ab c"),
    ("yes - no", "yes no"),  # "-" removed -> "yes  no", the double space collapses on the split
    ("red/blue", "red blue"),  # "/" touches no space -> a space
    ("red / blue", "red blue"),  # "/" next to a space -> removed
    # "-" touches no space -> a space; "(" follows a space -> removed; ")" touches no space -> a space
    ("t-shirt (red)", "t shirt red"),
    ('"big" dog', "big dog"),  # '" ' occurs -> every '"' removed
    ('"quoted"', "quoted"),  # no '"' next to a space -> spaces, stripped by the split
    ("hello!", "hello"),
    ("wow! cool", "wow cool"),
    ("x=y", "x y"),
    ("c+d", "c d"),
    ("snake_case", "snake case"),
    ("back\\slash", "back slash"),
    ("<3", "3"),
    ("@home", "home"),
    ("[box]", "box"),
    ("{set}", "set"),
    ("semi;colon", "semi colon"),
    ("`tick`", "tick"),
    # marks outside the list stay: ":" "#" "%" "$" "&"
    ("10:30", "10:30"),
    ("#1", "#1"),
    ("50%", "50%"),
    ("$5", "$5"),
    ("r&b", "r&b"),
    # periods not followed by a digit are removed (not turned into spaces)
    ("e.g.", "eg"),
    ("u.s.a.", "usa"),
    ("3.5.", "3.5"),  # the first period has a digit after it, the second has not
    # the commas are removed before the punctuation step, so no thousands comma is left by then:
    # "1000-2000" has "-" touching no space -> a space
    ("1,000-2,000", "1000 2000"),
    ("yes, it is", "yes it is"),
    ("yes\nno", "yes no"),
    ("yes\tno", "yes no"),
])
def test_evalai_answer_punctuation(answer, normal):
    assert evalai_answer(answer) == normal


# --- VQA accuracy ----------------------------------------------------------------------------------------
# With k of the 10 annotators giving the predicted answer: leaving out one of those k leaves k - 1 matches,
# leaving out one of the other 10 - k leaves k. The accuracy is
#     (k * min((k - 1) / 3, 1) + (10 - k) * min(k / 3, 1)) / 10
# k = 0: 0
# k = 1: (1 * 0 + 9 * 1/3) / 10 = 3 / 10 = 0.3
# k = 2: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
# k = 3: (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10 = 0.9
# k = 4: (4 * 1 + 6 * 1) / 10 = 1.0
# k = 10: (10 * 1) / 10 = 1.0


@pytest.mark.parametrize("matching, accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matching, accuracy):
    annotators = ["cat"] * matching + ["dog"] * (10 - matching)
    assert textvqa_accuracy("cat", annotators) == pytest.approx(accuracy)


def test_vqa_accuracy_ignores_annotator_order():
    annotators = ["dog", "cat", "dog", "dog", "cat", "dog", "dog", "dog", "dog", "dog"]
    assert textvqa_accuracy("cat", annotators) == pytest.approx(0.6)  # k = 2


def test_vqa_accuracy_with_three_annotators():
    # leaving out either "yes" leaves 1 match (1/3), leaving out "no" leaves 2 (2/3): (1/3 + 1/3 + 2/3) / 3
    assert textvqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)


@pytest.mark.parametrize("prediction, matching_answer, accuracy", [
    ("Two", "2", 0.9),  # three annotators wrote "2": k = 3
    ("the dog.", "dog", 0.9),
    ("dont", "don't", 0.9),
    ("1,000", "1000", 0.9),
    ("black-and-white", "black and white", 0.9),
    ("2", "Two", 0.9),  # the annotators' answers are normalised too
    ("3.5", "35", 0.0),  # "3.5" keeps its period: no match
])
def test_textvqa_accuracy_normalises_both_sides(prediction, matching_answer, accuracy):
    annotators = [matching_answer] * 3 + ["something else"] * 7
    assert textvqa_accuracy(prediction, annotators) == pytest.approx(accuracy)


@pytest.mark.parametrize("prediction, annotator, vqav2, vizwiz", [
    ("2", "Two", 0.0, 0.0),  # VQAv2's server never lower-cases or maps number words on the annotators' side
    ("Two", "2", 0.9, 0.9),  # the reply is normalised: "2"
    ("it's", "it's", 0.0, 0.0),  # submitted as "it 's" (LLaVA's conversion splits "'s")
    ("black-and-white", "black and white", 0.9, 0.9),
    ("Red", "red", 0.9, 0.9),
])
def test_vqav2_and_vizwiz_normalise_the_reply_not_the_annotators(prediction, annotator, vqav2, vizwiz):
    annotators = [annotator] * 3 + ["something else"] * 7
    assert vqav2_accuracy(prediction, annotators) == pytest.approx(vqav2)
    assert vizwiz_accuracy(prediction, annotators) == pytest.approx(vizwiz)


def test_vqa_accuracy_one_matching_after_normalisation():
    annotators = ["Dog"] + ["cat"] * 9  # "the dog." and "Dog" both normalise to "dog": k = 1
    assert textvqa_accuracy("the dog.", annotators) == pytest.approx(0.3)


@pytest.mark.parametrize("rule", [vqav2_accuracy, vizwiz_accuracy, textvqa_accuracy])
@pytest.mark.parametrize("annotators", [[], ()])
def test_vqa_accuracy_needs_annotators(annotators, rule):
    with pytest.raises(ValueError):
        rule("yes", annotators)


# --- GQA -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, normal", [
    ("Yes.", "yes"),
    ("  Dog.  ", "  dog.  "),  # nothing stripped: the period is not final (LLaVA's replies come stripped)
    ("left..", "left"),  # all final periods
    ("3.5", "3.5"),  # a period inside stays
    ("U.S.", "u.s"),  # only the final period goes
    ("Red Car", "red car"),
    ("", ""),
])
def test_gqa_normalize(answer, normal):
    assert gqa_normalize(answer) == normal


# --- POPE ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, reading", [
    ("Yes.", "yes"),
    ("Yes, there is a dog in the image.", "yes"),
    ("No.", "no"),
    ("no", "no"),
    ("No, there is not.", "no"),  # first sentence "No, there is not" -> "No there is not": "No"
    ("There is not a dog.", "no"),
    ("The answer is no.", "no"),
    ("Not at all", "yes"),  # "Not" is none of "No", "no", "not" (case matters)
    ("NO", "yes"),  # case matters
    ("Nope", "yes"),
    ("", "yes"),  # an empty reply has no "no" word
    ("Yes. There is no dog.", "yes"),  # only the first sentence counts
    ("No,there is", "yes"),  # the comma is removed, not turned into a space: "Nothere"
    ("Yes, it is not", "no"),  # commas removed: "Yes it is not"
    ("There is no\ndog", "yes"),  # split on single spaces: the word is "no\ndog"
    ("No  dog", "no"),  # split on single spaces: "No", "", "dog"
    ("I see no. Yes", "no"),  # first sentence "I see no"
])
def test_pope_yes_no(reply, reading):
    assert pope_yes_no(reply) == reading


# --- MME -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, reading", [
    ("yes", "yes"),
    ("Yes", "yes"),
    (" NO ", "no"),  # lower-cased and stripped
    ("Yes, there is", "yes"),  # first 4 characters "yes,"
    ("Yes.", "yes"),
    ("No.", "no"),
    ("Nope", "no"),  # "no" in "nope"
    ("Not sure", "no"),  # "no" in "not "
    ("know", "no"),  # "no" in "know": the rule does not look at words
    ("There is a cat", None),  # "ther"
    ("I think yes", None),  # "i th": "yes" comes too late
    ("Unknown", None),  # "unkn" holds neither
    ("Sure", None),
    ("", None),
])
def test_mme_yes_no(reply, reading):
    assert mme_yes_no(reply) == reading


# --- Letter of an option by VLMEvalKit's rules (MMBench, SEED-Bench) -------------------------------------

OPTIONS = {"A": "red", "B": "blue", "C": "green"}


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"),
    ("(B) red", "B"),  # the letter rule comes first: "B" is a word once "(" ")" are spaces; "red" is not asked
    ("The answer is B.", "B"),  # words "The", "answer", "is", "B"
    ("B.", "B"),
    ("B:", "B"),
    ("[C]", "C"),
    ("**C**", "C"),
    ("{A}", "A"),
    ("B!", "B"),
    ("I think it is a B", "B"),  # "a" is not the letter "A": letters are upper case as given
    ("A or B", None),  # two letters
    ("A, B", None),
    ("D", None),  # no option letter and no option text
    ("b", None),  # not a letter (case matters) nor a text
    ("It is red", "A"),  # no letter: the one option text in the reply
    ("Blue", "B"),  # the text rule lower-cases the reply
    ("It is BLUE!", "B"),
    ("red or blue", None),  # two option texts
    ("B-", None),  # "-" is no separator: the word "B-" is no letter, and no option text occurs
    ("I don't know", None),
])
def test_letter_by_rules(reply, letter):
    assert letter_by_rules(reply, OPTIONS) == letter


def test_letter_by_rules_option_texts_are_lower_cased():
    assert letter_by_rules("it is dark red", {"A": "Dark Red", "B": "Light Blue"}) == "A"


def test_letter_by_rules_texts_contained_in_each_other():
    # "red" is contained in "reddish": both option texts occur -> no single option
    assert letter_by_rules("reddish", {"A": "red", "B": "reddish"}) is None


def test_letter_by_rules_only_given_letters():
    # "C" is a word but not an option here, and "B" is: one letter
    assert letter_by_rules("C or B", {"A": "red", "B": "blue"}) == "B"


# --- ScienceQA (LLaVA's eval_science_qa.py) --------------------------------------------------------------

LETTERS = ["A", "B", "C"]


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"),  # the reply is a letter
    ("D", None),  # not one of the letters
    ("b", None),
    ("B. blue", "B"),  # reply[0] a letter, reply[1:3] == ". "
    ("A. ", "A"),  # exactly three characters
    ("B.", None),  # reply[1:3] == "." only, and no "The answer is"
    ("B) blue", None),
    ("A.B", None),  # reply[1:3] == ".B"
    ("The answer is C.", "C"),
    ("Because it is cold. The answer is A.", "A"),
    ("The answer is A", None),  # the regex needs the period
    ("the answer is A.", None),  # the regex is case-sensitive
    ("The answer is (B).", None),
    ("", None),
])
def test_scienceqa_letter(reply, letter):
    assert scienceqa_letter(reply, LETTERS) == letter


def test_scienceqa_letter_outside_the_options():
    # The regex finds "D", but D is none of this question's letters: the official script counts it wrong
    assert scienceqa_letter("The answer is D.", LETTERS) is None


def test_several_letters_fall_back_to_the_option_text():
    # VLMEvalKit's can_infer: two letters -> can_infer_option gives up -> can_infer_text finds one option text
    assert letter_by_rules("A or B? It is red", {"A": "red", "B": "blue"}) == "A"


def test_scienceqa_needs_exactly_one_answer_is():
    # LLaVA's eval_science_qa.py: findall must find exactly one "The answer is X."
    assert scienceqa_letter("The answer is B. The answer is C.", ["A", "B", "C"]) is None
    assert scienceqa_letter("I think The answer is C!", ["A", "B", "C"]) == "C"  # "." matches any character
