"""Serving building blocks without Ray Serve: request validation, checkpoint sources, batched generation."""

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
import torch
from filelock import FileLock
from PIL import Image

from llava_platform.inference import merge_inputs
from llava_platform.model.sources import CheckpointSourceError, resolve_checkpoint
from serve.app import serving_dtype
from serve.generation import Generator
from serve.openai_api import ApiError, Limits, parse_chat_request

LIMITS = Limits(max_tokens=16, max_images=2, max_image_bytes=50_000, max_image_pixels=200 * 200)


def data_url(size=(40, 30), fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def chat(*content, role="user", **extra):
    return {"model": "m", "messages": [{"role": role, "content": list(content)}], **extra}


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text="What is this?"):
    return {"type": "text", "text": text}


def test_valid_request_keeps_parts_and_decodes_images():
    parsed = parse_chat_request(chat(text_part(), image_part(data_url()), max_tokens=8, stop="\n"), LIMITS)
    assert parsed.conversation == [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                                 {"type": "image"}]}]
    assert [im.size for im in parsed.images] == [(40, 30)] and parsed.max_tokens == 8 and parsed.stop == ["\n"]
    assert parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, LIMITS).max_tokens == 16


@pytest.mark.parametrize(("body", "expected"), [
    ([], "JSON object"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "at least one message"),
    (chat(text_part(), role="robot"), "'robot' is not one of"),
    (chat({"type": "audio"}), "a part must be"),
    (chat(image_part("data:image/png;base64,@@@not-base64@@@")), "not valid base64"),
    (chat(image_part("data:image/png;base64," + base64.b64encode(b"plain text").decode())), "not a decodable image"),
    (chat(image_part(data_url(size=(300, 300)))), "pixels"),
    (chat(image_part(data_url(size=(4, 100)))), "aspect ratio of 25.0:1"),
    (chat(image_part("data:image/png;base64," + "A" * 80_000)), "byte limit"),
    (chat(*[image_part(data_url())] * 3), "at most 2"),
    (chat(text_part(), max_tokens=17), "cap of 16"),
    (chat(image_part("https://example.com/cat.png")), "fetches no remote URLs"),
    (chat(image_part("file:///etc/passwd")), "fetches no remote URLs"),
    (chat(text_part(), temperature=5), "temperature"),
    (chat(text_part(), seed=2**64), "seed"),
    (chat(text_part("look: <image>")), "may not contain <image>"),
    (chat(text_part("\ud800")), "not valid Unicode"),
    (chat({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}), "image_url.url is missing"),
])
def test_bad_requests_get_a_400_that_names_the_problem(body, expected):
    with pytest.raises(ApiError) as error:
        parse_chat_request(body, LIMITS)
    assert error.value.status == 400 and expected in error.value.message
    assert error.value.body()["error"]["type"] == "invalid_request_error"


def test_allow_listed_hosts_are_fetched_with_the_given_function():
    fetched = []
    limits = Limits(allowed_image_hosts=("images.internal",))
    png = base64.b64decode(data_url().split(",")[1])
    parsed = parse_chat_request(chat(image_part("https://images.internal/a.png")), limits,
                                fetcher=lambda url, max_bytes: fetched.append(url) or png)
    assert fetched == ["https://images.internal/a.png"] and len(parsed.images) == 1


def test_checkpoint_sources(saved_checkpoints, tmp_path, s3_server):
    local = saved_checkpoints["llava"]
    assert resolve_checkpoint(str(local), tmp_path) == local
    with pytest.raises(CheckpointSourceError, match="no config.json"):
        resolve_checkpoint(str(tmp_path), tmp_path / "cache")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="models")
    for file in local.iterdir():
        s3.upload_file(str(file), "models", f"tiny/{file.name}")
    folder = resolve_checkpoint("s3://models/tiny", tmp_path / "cache", s3_endpoint_url=s3_server)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in local.iterdir())
    assert (folder / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()

    # a second replica on the node waits while the first holds the download, then reuses the folder
    with ThreadPoolExecutor(1) as pool:
        with FileLock(f"{folder}.lock"):
            waiting = pool.submit(resolve_checkpoint, "s3://models/tiny", tmp_path / "cache",
                                  s3_endpoint_url=s3_server)
            time.sleep(0.5)
            assert not waiting.done(), "resolve_checkpoint did not wait for the download lock"
        assert waiting.result(timeout=30) == folder


def test_serving_dtype():
    assert serving_dtype("auto", "cpu") == torch.float32
    assert serving_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="args.dtype is 'fp8'"):
        serving_dtype("fp8", "cuda")


def test_registered_model_resolves_to_the_checkpoint_folder(saved_checkpoints, tmp_path):
    from llava_platform import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "serve-test", "export")
    version = tracking.register_export(uri, run_id, saved_checkpoints["llava"], "tiny-llava")
    tracking.client_for(uri).set_registered_model_alias("tiny-llava", "champion", version)
    for source in (f"models:/tiny-llava/{version}", "models:/tiny-llava@champion"):
        folder = resolve_checkpoint(source, tmp_path / "cache", tracking_uri=uri)
        assert (folder / "config.json").read_bytes() == (saved_checkpoints["llava"] / "config.json").read_bytes()
    with pytest.raises(CheckpointSourceError, match="cannot download"):
        resolve_checkpoint("models:/no-such-model/1", tmp_path / "cache", tracking_uri=uri)


@pytest.fixture(scope="module")
def generators(saved_checkpoints):
    return {arch: Generator(path) for arch, path in saved_checkpoints.items()}


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_batched_generation_matches_one_at_a_time(generators, arch):
    generator = generators[arch]
    requests = [parse_chat_request(chat(text_part(f"Question {i}?"), *([image_part(data_url((30 + 10 * i, 40)))]
                                                                       if i % 2 == 0 else []),
                                        max_tokens=4 + i, temperature=0), LIMITS) for i in range(3)]
    prepared = [generator.prepare(r) for r in requests]
    alone = [generator.generate([p])[0] for p in prepared]
    calls = generator.generate_calls
    together = generator.generate(prepared)
    assert generator.generate_calls == calls + 1, "requests with the same sampling settings share one generate"
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in alone]
    assert all(c.completion_tokens <= r.max_tokens for c, r in zip(together, requests, strict=True))
    assert all(c.prompt_tokens == p.prompt_tokens > 0 for c, p in zip(together, prepared, strict=True))


def test_prompt_over_the_context_is_refused(generators):
    generator = generators["llava"]
    long = parse_chat_request(chat(text_part("word " * generator.context_length), max_tokens=4), LIMITS)
    with pytest.raises(ApiError, match="over the model's context") as error:
        generator.prepare(long)
    assert error.value.code == "context_length_exceeded"


def test_merge_inputs_left_pads_and_pads_tile_stacks():
    first = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.ones(1, 3, 3, 2, 2), "image_sizes": torch.tensor([[10, 20]])}
    second = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
              "pixel_values": torch.ones(1, 5, 3, 2, 2), "image_sizes": torch.tensor([[30, 40]])}
    merged = merge_inputs([first, second], pad_token_id=0)
    assert merged["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert merged["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert merged["pixel_values"].shape == (2, 5, 3, 2, 2) and merged["pixel_values"][0, 3:].abs().sum() == 0
    assert merged["image_sizes"].tolist() == [[10, 20], [30, 40]]


@pytest.mark.fault("security: a decompression bomb (40000 x 40000 px in a 200 kB PNG)")
def test_an_image_bomb_is_refused_from_its_header_before_decoding():
    import resource

    png = bilevel_png(40_000, 40_000)  # 4.8 GB once decoded to RGB
    assert len(png) < 1_000_000
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ApiError) as error:
        parse_chat_request(chat(image_part(url)), Limits(max_tokens=16, max_images=2, max_image_bytes=2_000_000,
                                                         max_image_pixels=200 * 200))
    assert error.value.status == 400 and "pixels" in error.value.message
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 200_000, f"the peak memory grew by {grown_kib} KiB: the image was decoded"


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG, compressed row by row (never held decoded in memory)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
