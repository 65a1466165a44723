"""The Ray Serve endpoint on the session's head node, called over real HTTP with the official openai client.

The applications here live under their own route prefixes beside whatever else the cluster serves
(the end-to-end job deploys its own at ``/``), and each is deleted at the end, never Serve itself.
The ``server`` application (``conftest.py``) is shared with the chat page's browser test.
"""

import base64
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import openai
import pytest

from jobs import deploy
from tests.helpers.endpoint import KEY, MODEL, VLLM_TEST_SETTINGS, ask, client, config, data_url
from tests.helpers.losses import Loss, chat_outcome, http_outcome, record_loss, requests_loss


def post(url, body, key=KEY, raw=False):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=data, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def stats(url):
    request = urllib.request.Request(f"{url}/v1/stats", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_openai_client_plain_and_streaming_with_an_image(endpoint):
    server = endpoint
    answer = ask(server)
    assert isinstance(answer.choices[0].message.content, str) and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 1 and 0 <= answer.usage.completion_tokens <= 6
    chunks = list(ask(server, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content, "greedy streaming and non-streaming answers differ"
    assert chunks[-1].choices[0].finish_reason is not None and chunks[-1].usage.prompt_tokens == \
        answer.usage.prompt_tokens
    text = answer.choices[0].message.content
    if len(text) >= 3:  # a stop string from inside the answer: both paths cut there, streaming holds it back
        stop = text[1:3]
        cut = ask(server, stop=stop).choices[0]
        streamed_cut = "".join(c.choices[0].delta.content or "" for c in ask(server, stop=stop, stream=True)
                               if c.choices)
        assert cut.message.content == streamed_cut == text[: text.index(stop)] and cut.finish_reason == "stop"
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    with urllib.request.urlopen(f"{server}/healthz", timeout=30) as response:
        assert json.loads(response.read())["status"] == "ok"


@pytest.mark.fault("serve: 14 kinds of malformed request (bad JSON, base64, image bombs, remote URLs...)")
def test_bad_input_gets_4xx_and_the_replica_keeps_serving(endpoint, record_property):
    server = endpoint
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad_image = base64.b64encode(b"not an image at all").decode()
    cases = [
        (b"{not json", 400, "not valid JSON"),
        ({"model": MODEL}, 400, "messages"),
        ({**good, "messages": []}, 400, "at least one message"),
        ({**good, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "'wizard'"),
        ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}, 400, "base64"),
        ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{bad_image}"}}]}]}, 400, "decodable"),
        ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url((600, 600))}}]}]}, 400, "pixels"),
        ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url((10, 400))}}]}]}, 400, "aspect ratio"),
        ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 300_000}}]}]}, 400,
         "byte limit"),
        ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url()}}] * 3}]}, 400, "at most 2"),
        ({**good, "max_tokens": 33}, 400, "cap of 32"),
        ({**good, "messages": [{"role": "user", "content": "word " * 5000}]}, 400, "context"),
        ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]}]}, 400, "remote URLs"),
        ({**good, "model": "gpt-4o"}, 404, "not served here"),
    ]
    outcomes, expected, payloads = [], [], []
    for body, status, message in cases:
        got, payload = post(server, body, raw=isinstance(body, bytes))
        named = message in payload.get("error", {}).get("message", "")  # a 4xx that does not say why is wrong
        outcomes.append(str(got) if got != status or named else "wrong")
        expected.append(str(status))
        payloads.append(payload)
    outcomes.append(http_outcome(post(server, good)[0]))  # then a valid one, on the same replica
    expected.append("ok")
    loss, = record_loss(record_property, requests_loss(outcomes, expected))
    assert not loss.count, f"{loss}: {list(zip(outcomes, expected, payloads, strict=False))}"


@pytest.mark.fault("security: requests without or with a wrong API key")
def test_wrong_or_missing_api_key_gets_401(endpoint, record_property):
    server = endpoint
    try:
        client(server, key="wrong").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        outcomes = ["ok"]
    except openai.APIStatusError as error:
        outcomes = [http_outcome(error.status_code)]
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{server}/v1/models"), timeout=30) as response:
            outcomes.append(http_outcome(response.status))
    except urllib.error.HTTPError as error:
        outcomes.append(http_outcome(error.code))
    loss, = record_loss(record_property, requests_loss(outcomes, "401"))  # "ok": let in without the key
    assert not loss.count, loss


def test_concurrent_requests_are_batched(endpoint):
    """16 at once: transformers answers them in fewer ``generate`` calls, vLLM's engine finishes all 16."""
    before = stats(endpoint)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: ask(endpoint, text=f"Question {i}", image=i % 2 == 0), range(16)))
    after = stats(endpoint)
    assert all(a.choices[0].message.content is not None for a in answers)
    requests = after["requests"] - before["requests"]
    engine, was = after["engine"], before["engine"]
    if "finished" in engine:  # an engine that batches continuously (vLLM): every request finished there
        assert requests == 16 and engine["finished"] - was["finished"] == 16
    else:
        calls = engine["generate_calls"] - was["generate_calls"]
        assert requests == 16 and calls < requests, f"{requests} requests took {calls} generate calls"


def test_a_seed_makes_sampling_repeatable(endpoint):
    """Sampling with a seed gives the same answer twice (each engine has its own random generator, so the
    engines need not agree with each other); without ``max_tokens`` reached early, usage counts match."""
    options = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 12}
    first, second = ask(endpoint, seed=7, **options), ask(endpoint, seed=7, **options)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.completion_tokens == second.usage.completion_tokens
    others = {ask(endpoint, seed=seed, **options).choices[0].message.content for seed in range(8, 12)}
    assert len(others | {first.choices[0].message.content}) > 1, "the seed changes nothing: not sampling"


def test_both_engines_give_the_same_greedy_answers_and_usage(server, vllm_server):
    """vLLM (continuous batching, its own image processing) and transformers answer token for token alike, and
    both decode the whole answer's token ids with the checkpoint's tokenizer: the same text, to the byte (an
    answer cut by ``max_tokens`` inside a multi-byte character ends in U+FFFD on both; the random tiny model
    writes arbitrary bytes)."""
    for i in range(6):
        options = {"text": f"Question {i}: what colour is it?", "image": i % 3 != 2, "max_tokens": 8 + 4 * i % 24}
        by_transformers, by_vllm = ask(server, **options), ask(vllm_server, **options)
        assert by_vllm.choices[0].message.content == by_transformers.choices[0].message.content, options
        assert by_vllm.usage.model_dump() == by_transformers.usage.model_dump(), options
        assert by_vllm.choices[0].finish_reason == by_transformers.choices[0].finish_reason, options


@pytest.mark.chaos  # 16 s; in make test the end-to-end job deploys its models:/ URI from the same server
def test_model_from_a_real_mlflow_server(server, serve_base, serve_port, saved_checkpoints, mlflow_server, tmp_path):
    from ray import serve

    from llava_platform import registry, tracking

    run_id = tracking.start_run(mlflow_server, "serve", "export")
    version = registry.register_export(mlflow_server, run_id, saved_checkpoints["llava_next"], "tiny-next")
    app = config("from-mlflow", "/mlflow", serve_port, num_replicas=1)["applications"][0]
    args = {**app["args"], "model": f"models:/tiny-next/{version}", "model_name": MODEL, "api_key": KEY,
            "tracking_uri": mlflow_server, "cache_dir": str(tmp_path)}
    serve.run(deploy.LlavaServer.options(ray_actor_options={"num_cpus": 0.25}).bind(**args), name="from-mlflow",
              route_prefix="/mlflow", blocking=False)
    answer = ask(serve_base, prefix="/mlflow")
    assert answer.usage.prompt_tokens > ask(server).usage.prompt_tokens, "anyres should spend more image tokens"
    serve.delete("from-mlflow")


@dataclass
class LoadScenario:
    """What one autoscaling application did under load, a replica killed mid-load, and once idle."""

    peak: int = 1
    """The most RUNNING replicas seen under load (autoscaling bounds 1 to 2)."""
    victim: str = ""
    killed_at: float | None = None
    replaced_at: float | None = None
    """When two replicas were running again, the killed one not among them (load still on)."""
    reference: str = ""
    """The greedy answer to the valid request, asked once before the load: every answer under load must be it."""
    requests: list[tuple[float, str, str]] = field(default_factory=list)
    """Per request: (time it ended, expected outcome, outcome) in ``losses.http_outcome``'s words."""

    def loss(self, before_kill: bool) -> Loss:
        """The requests that ended before the kill (autoscaling up under load), or after it (the kill)."""
        chosen = [r for r in self.requests if (self.killed_at is None or r[0] < self.killed_at) == before_kill]
        return requests_loss([got for _, _, got in chosen], [want for _, want, _ in chosen])
    idle_replicas: int = 0
    """RUNNING replicas once the load had stopped and the downscale delay passed."""


@pytest.fixture(scope="module")
def load_scenario(server, serve_base, serve_port, saved_checkpoints) -> LoadScenario:
    """``run_load_scenario`` on the transformers engine."""
    return run_load_scenario(serve_base, serve_port, saved_checkpoints, {"max_batch_size": 1})


@pytest.fixture(scope="module")
def vllm_load_scenario(vllm_server, serve_base, serve_port, saved_checkpoints) -> LoadScenario:
    """``run_load_scenario`` on the vLLM engine: each replica owns its engine actor, which dies with it."""
    return run_load_scenario(serve_base, serve_port, saved_checkpoints,
                             {"engine": "vllm", "vllm": VLLM_TEST_SETTINGS})


def run_load_scenario(serve_base, serve_port, saved_checkpoints, engine_args: dict) -> LoadScenario:
    """An autoscaling application (1 to 2 replicas) under 32 concurrent clients, a quarter of their requests
    malformed: once the second replica is up, one of the two is killed while the load goes on; when it
    has been replaced, the load stops and the application should shrink back to one replica."""
    import ray
    from ray import serve

    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                   "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 1}
    app = config("scaling", "/scaling", serve_port, autoscaling_config=autoscaling)["applications"][0]
    args = {**app["args"], "model": str(saved_checkpoints["llava"]), "model_name": MODEL, "api_key": KEY,
            **engine_args}
    serve.run(deploy.LlavaServer.options(ray_actor_options={"num_cpus": 0.25}, autoscaling_config=autoscaling,
                                         max_ongoing_requests=32).bind(**args),
              name="scaling", route_prefix="/scaling", blocking=False)
    deadline = time.time() + 180
    while time.time() < deadline and serve.status().applications["scaling"].status != "RUNNING":
        time.sleep(0.5)

    def running() -> list[str]:
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::scaling#")]

    retrying = openai.OpenAI(base_url=f"{serve_base}/scaling/v1", api_key=KEY, max_retries=3, timeout=60)
    malformed = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!not-base64!!"}}]}]}

    def status_of(body: dict) -> int:
        request = urllib.request.Request(f"{serve_base}/scaling/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def valid() -> str:
        content = [{"type": "text", "text": "What colour?"}, {"type": "image_url", "image_url": {"url": data_url()}}]
        reply = retrying.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                 max_tokens=4, temperature=0)
        return reply.choices[0].message.content if reply.choices else None

    def one(i: int) -> tuple[str, str]:
        """``(expected, outcome)`` of request ``i``."""
        if i % 4 == 3:  # a quarter of the traffic is malformed: it must end in a 4xx
            for attempt in range(4):  # a request in flight on the killed replica gets the proxy's 500:
                status = status_of(malformed)  # retried, as the openai client retries 5xx
                if status < 500:
                    break
                time.sleep(0.5 * 2**attempt)
            return "4xx", http_outcome(status)
        return "ok", chat_outcome(valid, scenario.reference)

    scenario, stop = LoadScenario(), threading.Event()
    scenario.reference = valid()
    numbers = itertools.count()  # one sequence for all clients: every fourth request is malformed

    def client() -> None:
        while not stop.is_set():
            expected, outcome = one(next(numbers))
            scenario.requests.append((time.time(), expected, outcome))  # list.append is atomic

    with ThreadPoolExecutor(32) as pool:
        clients = [pool.submit(client) for _ in range(32)]
        deadline = time.time() + 180  # a vLLM replica starts its engine first
        while time.time() < deadline and scenario.peak < 2:  # the load is on: the autoscaler adds a replica
            scenario.peak = max(scenario.peak, len(running()))
            time.sleep(0.25)
        if scenario.peak == 2:
            scenario.victim, scenario.killed_at = running()[0], time.time()
            ray.kill(ray.get_actor(scenario.victim, namespace="serve"), no_restart=True)
            deadline = time.time() + 120
            while time.time() < deadline and scenario.replaced_at is None:
                replicas = running()
                if len(replicas) == 2 and scenario.victim not in replicas:
                    scenario.replaced_at = time.time()
                time.sleep(0.5)
            while time.time() < deadline and len(scenario.requests) < 320:  # at least 320 requests in all
                time.sleep(0.5)
            time.sleep(2)  # requests keep flowing to the new replica
        stop.set()
        for c in clients:
            c.result()

    def replicas_running() -> int:
        return serve.status().applications["scaling"].deployments["LlavaServer"].replica_states.get("RUNNING", 0)

    deadline = time.time() + 60
    while time.time() < deadline and replicas_running() != 1:
        time.sleep(0.5)
    scenario.idle_replicas = replicas_running()
    serve.delete("scaling")
    return scenario


@pytest.mark.fault("serve: sustained load, then none (autoscaling up to max, back to min)")
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(load_scenario, record_property):
    loss, = record_loss(record_property, load_scenario.loss(before_kill=True))
    assert load_scenario.peak == 2, "no second replica under load"
    assert loss.total > loss.count, "no request was answered while scaling up"
    assert not loss.count, f"requests lost while scaling up: {loss}"
    assert load_scenario.idle_replicas == 1, "the extra replica was not removed when idle"


@pytest.mark.fault("serve: a replica killed under load at concurrency 32, malformed requests mixed in")
def test_a_replica_killed_under_load_is_replaced_and_valid_requests_are_answered(load_scenario, record_property):
    assert_survived_the_kill(load_scenario, record_property)


@pytest.mark.chaos
@pytest.mark.fault("vllm: an engine replica killed under load at concurrency 32, malformed requests mixed in")
def test_a_vllm_replica_killed_under_load_is_replaced_and_valid_requests_are_answered(vllm_load_scenario,
                                                                                      record_property):
    assert vllm_load_scenario.peak == 2, "no second replica under load"
    assert_survived_the_kill(vllm_load_scenario, record_property)


def assert_survived_the_kill(scenario: LoadScenario, record_property) -> None:
    """After the kill: every malformed request a 4xx, fewer than 1% of the valid ones failed (a request in
    flight on the killed replica can fail after the client's retries), no wrong answer, the replica replaced."""
    loss, = record_loss(record_property, scenario.loss(before_kill=False))
    assert scenario.victim, "no replica was killed: the fault was not injected"
    assert len(scenario.requests) >= 320, f"only {len(scenario.requests)} requests under load"
    after = [(want, got) for at, want, got in scenario.requests if at >= scenario.killed_at]
    assert all(got == "4xx" for want, got in after if want == "4xx"), after
    assert not [got for want, got in after if got == "wrong"], f"wrong answers under load: {loss}"
    valid = [got for want, got in after if want == "ok"]
    failed_share = sum(got != "ok" for got in valid) / len(valid)
    assert failed_share < 0.01, f"{failed_share:.1%} of valid requests failed: {loss}"
    assert scenario.replaced_at is not None, "the killed replica was not replaced"
