"""Our own Serve endpoint as the data generation job's teacher (the tiny text model behind the OpenAI API):
the plumbing end to end through a real HTTP server. The tiny model writes no usable instruction data, so
nearly every response is quarantined: what is checked is that each one ends as a record or with a reason."""

import json

from jobs import generate_data
from llava_platform.datagen.parse import REASONS
from tests.helpers.endpoint import KEY, MODEL


def test_our_endpoint_as_the_teacher(server, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", KEY)
    contexts = [{"id": f"img{i}", "image": f"images/{i}.jpg", "captions": [f"A red circle number {i}.", "A shape."],
                 "boxes": [{"label": "circle", "bbox": [0.1, 0.1, 0.5, 0.5]}]} for i in range(2)]
    (tmp_path / "contexts.jsonl").write_text("".join(json.dumps(c) + "\n" for c in contexts))
    result = generate_data.main(["--annotations", str(tmp_path / "contexts.jsonl"), "--endpoint", f"{server}/v1",
                                 "--model", MODEL, "--api-key-env", "TEACHER_KEY", "--output", str(tmp_path / "out"),
                                 "--max-tokens", "12", "--concurrency", "6", "--tracking-uri", mlflow_server])
    run = result.manifest["this_run"]
    assert run["failed"] == 0 and run["requests"] == 6 and run["ok"] + run["quarantined"] == 6
    assert run["completion_tokens"] > 0 and run["prompt_tokens"] > 0  # the endpoint's own usage numbers
    quarantine = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantine) == run["quarantined"] >= 4 and all(q["reason"] in REASONS for q in quarantine)
    written = sum(len(json.loads(path.read_text())) for path in result.files.values())
    assert written == run["ok"]
