"""``jobs.generate_data`` against the tests' scripted OpenAI-protocol teacher (its own process on 127.0.0.1):
well-formed answers, refusals, leaks, truncation, 429s, 500s, timeouts and malformed bodies in a fixed
pattern; a token budget that stops the first run; the second run asks only for what is missing; the
records pass our own preprocessing. (Our Serve endpoint as the teacher: ``tests/integration/serve``.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import generate_data
from llava_platform.data.records import RowBuilder
from llava_platform.data.synthetic import write_coco_style
from llava_platform.datagen.annotations import read_coco
from llava_platform.datagen.parse import REASONS
from llava_platform.model.compose import load_processor
from llava_platform.testing.chat_server import ChatServer
from tests.helpers.losses import record_loss, records_loss
from tests.helpers.specs import row_spec

SCRIPTS = ["FAULT:refuse", "FAULT:leak", "FAULT:empty", "FAULT:truncated", "FAULT:unparseable", "FAULT:turns",
           "RETRY:429", "RETRY:500", "RETRY:timeout", "RETRY:malformed", "ALWAYS:500"]
NORMAL = 3
CAP = 8000
"""Run 1's --max-total-tokens: a few requests' worth (a conversation request reserves ~2000: its prompt's
UTF-8 bytes + 16 per message + --max-tokens)."""
TYPES = ("conversation", "detail", "reasoning")


def write_annotations(root: Path, scripts: list[str], normal: int) -> Path:
    """Synthetic COCO-style images; the first caption of the first ``len(scripts)`` replaced by a script."""
    captions, instances = write_coco_style(root, images=len(scripts) + normal, seed=3)
    lines = []
    for i, context in enumerate(read_coco(str(captions), str(instances))):
        first = [scripts[i]] if i < len(scripts) else []
        lines.append(json.dumps({"id": context.id, "image": context.image,
                                 "captions": first + list(context.captions[len(first):]),
                                 "boxes": [{"label": b.label, "bbox": [b.x1, b.y1, b.x2, b.y2]}
                                           for b in context.boxes]}))
    (root / "contexts.jsonl").write_text("\n".join(lines) + "\n")
    return root / "contexts.jsonl"


def job(annotations: Path, server: ChatServer, output: Path, tracking_uri: str, *extra: str) -> list[str]:
    return ["--annotations", str(annotations), "--endpoint", server.url, "--model", "scripted-teacher",
            "--output", str(output), "--tracking-uri", tracking_uri, "--concurrency", "4", "--max-tokens", "64",
            "--max-retries", "1", "--timeout", "1", "--price-per-1m-input", "2", "--price-per-1m-output", "8",
            *extra]


@pytest.fixture(scope="module")
def scripted(ray_cluster, mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("datagen")
    annotations = write_annotations(root, SCRIPTS, NORMAL)
    with ChatServer(timeout_sleep=2.0) as server:
        first = generate_data.main(job(annotations, server, root / "out", mlflow_server, "--max-total-tokens",
                                       str(CAP)))
        billed_first = server.stats()["billed"]  # the teacher's own bill for run 1, every try counted
        second = generate_data.main(job(annotations, server, root / "out", mlflow_server))
        yield root, first, second, server.stats() | {"url": server.url, "billed_first": billed_first}


def test_a_token_budget_stops_the_run_and_the_next_run_asks_only_for_the_rest(scripted):
    _, first, second, stats = scripted
    run1, run2 = first.manifest["this_run"], second.manifest["this_run"]
    assert run1["not_sent_budget"] > 0 and run1["ok"] + run1["quarantined"] > 0
    # every try reserved its worst case before it was sent; the teacher's own bill stays under the cap
    assert stats["billed_first"] <= run1["tokens_charged"] <= CAP
    assert run1["prompt_tokens"] + run1["completion_tokens"] <= run1["tokens_charged"]
    assert run2["not_sent_budget"] == 0
    # every (image, type) is asked for until it is answered once; what failed in run 1 is asked again
    assert run1["ok"] + run1["quarantined"] + run2["responses"] == len(SCRIPTS + [""] * NORMAL) * len(TYPES)
    answered = stats["answered"]
    for key, times in answered.items():
        if key.startswith("RETRY:timeout|"):  # the timed-out try is answered (late) after the client gave up
            assert times in (1, 2), key
        else:
            assert times == 1, key
    assert not [key for key in answered if key.startswith("ALWAYS:500")]


def test_responses_become_records_or_are_quarantined_with_their_reason(scripted):
    root, _, second, stats = scripted
    written = {kind: json.loads((root / "out" / f"{kind}.json").read_text()) for kind in TYPES}
    # 4 retried scripts + 3 normal images per type; the plain "unparseable" text is a fine description
    assert {kind: len(records) for kind, records in written.items()} == {"conversation": 7, "detail": 8,
                                                                        "reasoning": 7}
    quarantine = [json.loads(line) for line in (root / "out" / "quarantine.jsonl").read_text().splitlines()]
    reasons: dict[str, int] = {}
    for entry in quarantine:
        reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    assert reasons == {"refused": 3, "mentions_captions_or_boxes": 3, "empty": 3, "truncated": 3, "unparseable": 2,
                       "wrong_turn_structure": 3}
    assert set(reasons) <= set(REASONS) and all(e["message"] and e["kind"] in TYPES for e in quarantine)
    manifest = second.manifest
    assert manifest["written"] == {k: len(v) for k, v in written.items()}
    assert manifest["this_run"]["failed"] == 3  # ALWAYS:500, left for the next run, never quarantined
    assert (manifest["endpoint"], manifest["model"], manifest["prompt_version"]) == (
        stats["url"], "scripted-teacher", "v1")
    ids = [r["id"] for records in written.values() for r in records]
    assert len(ids) == len(set(ids)), "a record written twice"


def test_the_records_pass_our_own_preprocessing(scripted, saved_checkpoints):
    root, *_ = scripted
    builder = RowBuilder.from_processor(load_processor(str(saved_checkpoints["llava"])),
                                        row_spec(template="vicuna_v1", image_mode="pad", max_length=1024))
    for kind in TYPES:
        for record in json.loads((root / "out" / f"{kind}.json").read_text()):
            row = builder.build(record, (root / record["image"]).read_bytes())  # raises SampleError if refused
            assert row["length"] > 0 and record["conversations"][0]["value"].startswith("<image>\n")


def test_retries_usage_and_cost_land_in_the_manifest_and_mlflow(scripted, mlflow_server):
    from mlflow import MlflowClient

    _, first, second, _ = scripted
    run2 = second.manifest["this_run"]
    # run 2 retried each RETRY script once per type (those run 1 did not reach) and ALWAYS:500 once per type
    assert run2["retries"] >= 3 and run2["requests"] == run2["responses"] - run2["not_sent_budget"] + run2["retries"]
    assert run2["estimated_cost"] == pytest.approx((run2["prompt_tokens"] * 2 + run2["completion_tokens"] * 8) / 1e6)
    metrics = MlflowClient(mlflow_server).get_run(second.run_id).data.metrics
    assert metrics["datagen/written/detail"] == 8 and metrics["datagen/quarantined/refused"] == 3
    assert metrics["datagen/retries"] == run2["retries"]
    params = MlflowClient(mlflow_server).get_run(second.run_id).data.params
    assert params["prompt_version"] == "v1" and params["model"] == "scripted-teacher"
    assert first.run_id != second.run_id


@pytest.mark.chaos
@pytest.mark.fault("data generation: the job SIGKILLed while responses arrive, then rerun")
def test_a_run_killed_midway_loses_nothing_and_writes_nothing_twice(ray_cluster, mlflow_server, tmp_path,
                                                                   record_property):
    """SIGKILL the job while responses arrive (0.3 s each, 4 in flight); once Ray has stopped its actors (a few
    seconds after their driver), rerun: every (image, type) is written exactly once, and at most the 4
    requests in flight when the actors stopped were paid for twice."""
    annotations = write_annotations(tmp_path, [], 12)
    with ChatServer(service_time=0.3) as server:
        args = job(annotations, server, tmp_path / "out", mlflow_server)
        process = subprocess.Popen([sys.executable, "-m", "jobs.generate_data", *args], start_new_session=True,
                                   env=os.environ | {"RAY_ADDRESS": ray_cluster.address})
        deadline = time.monotonic() + 120
        while journaled(tmp_path / "out") < 8:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        settled, count = time.monotonic(), journaled(tmp_path / "out")
        while time.monotonic() - settled < 2:  # Ray stops the dead driver's actors within a few seconds
            time.sleep(0.2)
            if journaled(tmp_path / "out") != count:
                settled, count = time.monotonic(), journaled(tmp_path / "out")
        result = generate_data.main(args)
        answered = server.stats()["answered"]
    written = [r["id"] for kind in TYPES for r in json.loads((tmp_path / "out" / f"{kind}.json").read_text())]
    loss, = record_loss(record_property, records_loss([f"{i}-{kind}" for i in range(12) for kind in TYPES], written))
    assert not loss.count, loss
    assert result.manifest["this_run"]["ok"] < 36  # the rerun only asked for what the killed run had not written
    assert sum(times - 1 for times in answered.values()) <= 4


def journaled(output: Path) -> int:
    return sum(len(part.read_text().splitlines()) for part in (output / "parts").glob("part-*.jsonl"))


def test_bad_arguments_fail_before_any_request(tmp_path, capsys):
    (tmp_path / "prompts").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        generate_data.main(["--annotations", str(tmp_path / "missing.jsonl"), "--captions", "c.json",
                            "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--output", str(tmp_path / "o"),
                            "--types", "conversation,poems", "--prompts", str(tmp_path / "prompts")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not (tmp_path / "o").exists()
    for expected in ("--types: 'poems' is not one of conversation, detail, reasoning",
                     "--captions with --instances (COCO-style), or --annotations (JSON lines): exactly one input",
                     "--prompts: ", "conversation.yaml: missing"):
        assert expected in err
