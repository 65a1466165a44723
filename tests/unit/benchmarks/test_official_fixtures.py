"""Our scoring rules against the official scripts' own outputs.

``tests/fixtures/official_scoring/<family>.jsonl`` holds generated cases (punctuation, numbers, articles,
contractions, agreeing and disagreeing annotators, empty and multi-sentence replies, ...) with what the
official script gave for each, run outside this repository; ``<family>.provenance.json`` names each script
(repository, path, commit) and how it was run. Every case must match exactly. Each family also has a
negative control: a plausible but wrong rule (the one we used to have, or a naive one) must disagree with
the fixtures somewhere, so the fixtures can tell rules apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from llava_platform.benchmarks.choice import CIRCULAR_COPY
from llava_platform.benchmarks.rules import (
    evalai_answer,
    exact_letter,
    gqa_normalize,
    letter_by_rules,
    mme_yes_no,
    pope_yes_no,
    scienceqa_letter,
    textvqa_accuracy,
    vizwiz_accuracy,
    vqav2_accuracy,
)
from llava_platform.benchmarks.yesno import mme_scores, pope_metrics

FIXTURES = Path(__file__).parents[2] / "fixtures" / "official_scoring"
MIN_CASES = 200


def cases(family: str, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (FIXTURES / f"{family}.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if kind is None or row.get("kind", "single") == kind]


def mismatches(rows: list[dict], ours: Callable[[dict], object], official: Callable[[dict], object]) -> list:
    return [(row, ours(row), official(row)) for row in rows if ours(row) != official(row)]


def naive_vqa(reply: str, annotators: list[str]) -> float:
    """The rule we had: normalise the reply and every annotator answer fully, always."""
    answers = [evalai_answer(a) for a in annotators]
    matches = sum(a == evalai_answer(reply) for a in answers)
    return sum(min((matches - (a == evalai_answer(reply))) / 3, 1.0) for a in answers) / len(answers)


VQA_FAMILIES = {  # family: (our rule, the fixture field of the official output)
    "vqav2": (vqav2_accuracy, "official_evalai_server"),  # the challenge server (see the provenance file)
    "vizwiz": (vizwiz_accuracy, "official"),
    "textvqa": (textvqa_accuracy, "official"),
}


@pytest.mark.parametrize("family", list(VQA_FAMILIES))
def test_vqa_accuracy_equals_the_official_evaluator_on_every_case(family):
    rule, field = VQA_FAMILIES[family]
    rows = cases(family)
    assert len(rows) >= MIN_CASES
    wrong = mismatches(rows, lambda r: rule(r["reply"], r["answers"]), lambda r: r[field])
    assert not wrong, f"{len(wrong)} of {len(rows)} differ, e.g. {wrong[:3]}"


@pytest.mark.parametrize("family, at_least", [("vqav2", 20), ("vizwiz", 20)])
def test_normalising_everything_fails_the_vqa_fixtures(family, at_least):
    """Negative control: the old rule (both sides fully normalised) disagrees with the official outputs;
    TextVQA's evaluator does normalise both sides, so there the two must agree."""
    _, field = VQA_FAMILIES[family]
    wrong = mismatches(cases(family), lambda r: naive_vqa(r["reply"], r["answers"]), lambda r: r[field])
    assert len(wrong) >= at_least
    assert any(r["reply"] == "2" and set(r["answers"]) == {"two"} for r, *_ in wrong)  # "2" vs ten "two"
    assert not mismatches(cases("textvqa"), lambda r: naive_vqa(r["reply"], r["answers"]), lambda r: r["official"])


def test_vqav2_submission_is_llavas_conversion():
    """What LLaVA's convert_vqav2_for_submission.py wrote for each reply (the EvalAI answer processor)."""
    rows = cases("vqav2")
    assert not mismatches(rows, lambda r: evalai_answer(r["reply"]), lambda r: r["submitted"])


def test_pope_reads_every_reply_and_every_set_as_eval_pope():
    rows = cases("pope")
    replies = [r for r in rows if "reply" in r]
    sets = [r for r in rows if "replies" in r]
    assert len(replies) >= MIN_CASES and len(sets) >= 20
    assert not mismatches(replies, lambda r: pope_yes_no(r["reply"]), lambda r: r["official"])
    metrics = [(pope_metrics([(pope_yes_no(reply), label) for reply, label in zip(r["replies"], r["labels"],
                                                                                     strict=True)]), r["official"])
               for r in sets]
    assert all(ours[name] == value for ours, official in metrics for name, value in official.items())
    # negative control: reading "No" anywhere (not only in the first sentence) disagrees somewhere
    assert mismatches(replies, lambda r: "no" if "no" in r["reply"].lower().split() else "yes",
                      lambda r: r["official"])


def test_mme_reads_every_reply_and_scores_every_category_as_calculation_py():
    rows = cases("mme")
    replies = [r for r in rows if "reply" in r]
    categories = [r for r in rows if "images" in r]
    assert len(replies) >= MIN_CASES and len(categories) >= 20
    assert not mismatches(replies, lambda r: mme_yes_no(r["reply"]) or "other", lambda r: r["official"])
    for row in categories:
        right, image_of = {}, {}
        for image, questions in enumerate(row["images"]):
            for number, (reply, gold) in enumerate(questions):
                qid = f"{row['category']}/{image}.jpg/{number}"
                right[qid], image_of[qid] = mme_yes_no(reply) == gold.lower(), f"{row['category']}/{image}.jpg"
        ours = mme_scores(right, image_of)
        official = row["official"]
        assert ours[f"{row['category']}/accuracy"] == pytest.approx(100 * official["acc"], abs=1e-9)
        assert ours[f"{row['category']}/accuracy_plus"] == pytest.approx(100 * official["acc_plus"], abs=1e-9)
        assert ours[f"{row['category']}/score"] == pytest.approx(official["score"], abs=1e-9)
    # negative control: stripping the reply first (what we did) reads "  yes" as yes; the script does not
    assert mismatches(replies, lambda r: mme_yes_no(r["reply"].strip()) or "other", lambda r: r["official"])


def test_gqa_and_seed_compare_exactly_as_llavas_conversions():
    gqa, seed = cases("gqa"), cases("seed")
    assert len(gqa) >= MIN_CASES and len(seed) >= MIN_CASES
    assert not mismatches(gqa, lambda r: int(gqa_normalize(r["reply"]) == r["answer"]), lambda r: r["official"])
    assert not mismatches(seed, lambda r: int(exact_letter(r["reply"], r["answer"])), lambda r: r["official"])
    # negative controls: stripping spaces (what we did) and reading "A." as A disagree somewhere
    assert mismatches(gqa, lambda r: int(r["reply"].strip().rstrip(".").lower() == r["answer"]),
                      lambda r: r["official"])
    assert mismatches(seed, lambda r: int(r["reply"].strip(" .") == r["answer"]), lambda r: r["official"])


def test_scienceqa_picks_the_option_as_eval_science_qa():
    rows = cases("scienceqa")
    assert len(rows) >= MIN_CASES

    def picked(row: dict) -> int:
        letters = "ABCDE"[:row["n_options"]]
        letter = scienceqa_letter(row["reply"], list(letters))
        return letters.index(letter) if letter else -1

    assert not mismatches(rows, picked, lambda r: r["official_pred"])
    assert not mismatches(rows, lambda r: int(picked(r) == r["answer"]), lambda r: r["official_correct"])
    assert mismatches(rows, lambda r: "ABCDE".find(r["reply"].strip(" .()")[:1]), lambda r: r["official_pred"])


LEGACY = "official_legacy_c026693"
"""VLMEvalKit's rules before August 2025 (the leaderboard era of LLaVA-1.5's figures); see the provenance."""


def test_mmbench_reads_letters_as_vlmevalkit():
    rows = cases("mmbench", "single")
    assert len(rows) >= MIN_CASES
    assert not mismatches(rows, lambda r: letter_by_rules(r["reply"], dict(r["options"])) or False,
                          lambda r: r[LEGACY])
    # VLMEvalKit's current rules (a letter only among the last 4 words, "answer is X", a length cap) differ
    assert mismatches(rows, lambda r: r[LEGACY], lambda r: r["official"])


def test_mmbench_circular_groups_score_as_vlmevalkit_without_a_judge():
    groups = cases("mmbench", "circular")
    assert len(groups) >= 50

    def hit(group: dict) -> int:
        return int(all(letter_by_rules(r["reply"], dict(r["options"])) == r["answer"] for r in group["group"]))

    assert not mismatches(groups, hit, lambda g: g[LEGACY])
    assert {g[LEGACY] for g in groups} == {0, 1}
    assert CIRCULAR_COPY == 1_000_000


def test_every_family_names_its_official_scripts():
    for path in sorted(FIXTURES.glob("*.jsonl")):
        provenance = json.loads(path.with_suffix(".provenance.json").read_text())
        assert provenance["script"] and all({"repo", "path", "commit"} <= set(s) for s in provenance["script"])
        assert provenance["cases"] == len(path.read_text().splitlines())
