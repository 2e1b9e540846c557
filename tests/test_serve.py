"""`diffcap serve`: the HTTP API against tiny trained runs (captions equal CaptionPipeline's, the
trajectory, a text-conditioned run, bad input, limits, batching), and the batching queue on its own."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("gradio", reason="the serve extra is not installed (pip install -e '.[serve]')")

from fastapi.testclient import TestClient
from serve_helpers import TINY_MODEL, png_bytes, train_demo_run

from diffcap.cli import build_parser, main
from diffcap.data.contract import CaptionRecord, write_captions, write_features
from diffcap.data.encoders import TextEncoder
from diffcap.pipeline import CaptionPipeline
from diffcap.serve.app import create_app
from diffcap.serve.batching import BatchQueue, QueueFull
from diffcap.serve.limits import Limits

SCENE = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # the demo run's input size


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    return train_demo_run(tmp_path_factory.mktemp("serve_demo"))


@pytest.fixture(scope="module")
def client(image_run):
    with TestClient(create_app(image_run, limits=Limits(max_bytes=2**20))) as c:
        yield c


def pipeline_pixels(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]  # the run's features: uint8 [1 x 3 x 64 x 64]


def test_caption_equals_the_pipeline_and_trajectory_has_every_step(client, image_run):
    r = client.post(
        "/api/caption",
        files={"image": ("scene.png", png_bytes(SCENE), "image/png")},
        data={"seed": "7", "steps": "4", "guidance_scale": "1.5", "samples": "2", "trajectory": "true"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    expected = CaptionPipeline.from_pretrained(image_run)(
        pipeline_pixels(SCENE), seed=7, steps=4, guidance_scale=1.5, mbr=2, trajectory=True
    )
    assert body["caption"] == expected.texts[0]
    assert body["steps"] == 4 and body["seconds"] > 0
    assert len(body["trajectory"]) == 4
    assert [tuple(step) for step in body["trajectory"]] == expected.trajectories[0]
    timesteps = [t for t, _ in body["trajectory"]]
    assert timesteps == sorted(timesteps, reverse=True)  # from noise towards the caption

    # The run's own defaults hold when a request sets nothing, and no trajectory unless asked for.
    plain = client.post("/api/caption", files={"image": ("scene.png", png_bytes(SCENE))}).json()
    default = CaptionPipeline.from_pretrained(image_run)(pipeline_pixels(SCENE))
    assert plain["caption"] == default.texts[0] and plain["steps"] == 5 and "trajectory" not in plain


def test_health_reports_run_kind_and_defaults(client, image_run):
    health = client.get("/api/health").json()
    assert health["run"] == str(image_run) and health["kind"] == "diffusion" and health["accepts"] == ["image"]
    assert health["defaults"] == {"steps": 5, "guidance_scale": 1.0, "seed": 0, "samples": 1}
    assert health["limits"]["max_bytes"] == 2**20


def truncated_png() -> bytes:
    data = png_bytes(SCENE)
    return data[: len(data) // 2]


BAD_UPLOADS = [  # (what, file bytes, expected status, words the error must contain)
    ("a non-image", b"just some text, not a picture\n", 415, "not an image"),
    ("an empty file", b"", 400, "empty"),
    ("a truncated PNG", truncated_png(), 400, "truncated"),
    ("a 1 x 300000 image", png_bytes(np.zeros((300000, 1), dtype=np.uint8)), 413, "1 x 300000"),
    ("an oversized upload", b"\x89PNG" + bytes(2**20 + 100), 413, "upload limit"),
]


def test_bad_uploads_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(client):
    for what, data, status, words in BAD_UPLOADS:
        r = client.post("/api/caption", files={"image": ("upload.png", data, "image/png")})
        assert r.status_code == status, (what, r.text)
        assert set(r.json()) == {"error"} and words in r.json()["error"], (what, r.json())
        assert "Traceback" not in r.text
    bad_requests = [
        ({"files": {"image": ("a.png", png_bytes(SCENE))}, "data": {"steps": "0"}}, "steps must be in 1..100"),
        ({"files": {"image": ("a.png", png_bytes(SCENE))}, "data": {"seed": "abc"}}, "seed: expected an integer"),
        ({"files": {"image": ("a.png", png_bytes(SCENE))}, "data": {"temperature": "2"}}, "unknown field"),
        ({"files": {"image": ("a.png", png_bytes(SCENE))}, "data": {"samples": "1000"}}, "samples must be in"),
        ({"data": {"steps": "3"}}, "no 'image'"),
        ({"json": {"text": "a dog runs"}}, "takes an image"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "cannot be parsed"),
        ({"content": b"raw bytes", "headers": {"content-type": "image/png"}}, "multipart/form-data"),
    ]
    for kwargs, words in bad_requests:
        r = client.post("/api/caption", **kwargs)
        assert 400 <= r.status_code < 500 and words in r.json()["error"], (kwargs.get("data"), r.text)
    r = client.get("/api/nope")
    assert r.status_code == 404 and "POST /api/caption" in r.json()["error"]
    r = client.get("/api/caption")
    assert r.status_code == 405 and "use POST" in r.json()["error"]

    good = client.post("/api/caption", files={"image": ("scene.jpg", png_bytes(SCENE, "JPEG"))})
    assert good.status_code == 200 and isinstance(good.json()["caption"], str)


def test_pixel_limit_format_list_and_timeout_are_flags(image_run):
    limits = Limits(max_pixels=1000, formats=("JPEG",), timeout_s=1e-4)
    with TestClient(create_app(image_run, limits=limits, page=False)) as c:
        r = c.post("/api/caption", files={"image": ("a.jpg", png_bytes(SCENE, "JPEG"))})
        assert r.status_code == 413 and "4096 pixels" in r.json()["error"]
        r = c.post("/api/caption", files={"image": ("a.png", png_bytes(SCENE[:20, :20]))})
        assert r.status_code == 415 and "(JPEG)" in r.json()["error"]
        r = c.post("/api/caption", files={"image": ("a.jpg", png_bytes(SCENE[:20, :20], "JPEG"))})
        assert r.status_code == 503 and "did not finish within" in r.json()["error"]


def test_past_the_queue_length_the_answer_is_503_and_the_queued_requests_still_finish(image_run):
    app = create_app(image_run, limits=Limits(max_queue=1), max_wait_ms=0, page=False)
    service = app.state.service
    encode, busy, release = service.inputs.encode, threading.Event(), threading.Event()

    def held_encode(kind, items):  # the network is busy until the test releases it
        busy.set()
        release.wait(10)
        return encode(kind, items)

    service.inputs.encode = held_encode
    with TestClient(app) as c:
        answers = []

        def ask():
            answers.append(c.post("/api/caption", files={"image": ("a.png", png_bytes(SCENE))}))

        threads = [threading.Thread(target=ask) for _ in range(2)]
        threads[0].start()
        assert busy.wait(10)  # the first is on the network
        threads[1].start()
        deadline = time.monotonic() + 10
        while len(service.queue) < 1 and time.monotonic() < deadline:  # the second waits: the queue is full
            time.sleep(0.01)
        refused = c.post("/api/caption", files={"image": ("a.png", png_bytes(SCENE))})
        assert refused.status_code == 503 and "--max-queue 1" in refused.json()["error"]
        release.set()
        for t in threads:
            t.join()
        assert [a.status_code for a in answers] == [200, 200]


def test_concurrent_requests_share_a_batch(image_run):
    with TestClient(create_app(image_run, max_batch=8, max_wait_ms=300, page=False)) as c:
        results = [None] * 6
        scenes = [np.roll(SCENE, 7 * i, axis=0) for i in range(6)]

        def ask(i):
            r = c.post("/api/caption", files={"image": ("a.png", png_bytes(scenes[i]))}, data={"seed": "3"})
            results[i] = r.json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all("caption" in r for r in results), results
        assert max(r["batch_size"] for r in results) > 1
        assert c.get("/api/health").json()["batching"]["batches"] < 6


def test_autoregressive_run_takes_no_diffusion_settings(tmp_path):
    run = train_demo_run(tmp_path, kind="autoregressive")
    with TestClient(create_app(run, page=False)) as c:
        assert c.get("/api/health").json()["defaults"] == {}
        r = c.post("/api/caption", files={"image": ("a.png", png_bytes(SCENE))}, data={"trajectory": "true"})
        assert r.json()["caption"] == CaptionPipeline.from_pretrained(run)(pipeline_pixels(SCENE)).texts[0]
        for field in ("steps", "seed"):
            r = c.post("/api/caption", files={"image": ("a.png", png_bytes(SCENE))}, data={field: "4"})
            assert r.status_code == 400 and f"{field} apply to a diffusion run" in r.json()["error"]


# ------------------------------------------------------------------------------------------------ text runs

SENTENCES = [
    "a dog runs on the grass",
    "two children play in the snow",
    "a man rides a red bike",
    "a black cat sleeps on a sofa",
]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A run trained on CLIP text features (CapDec-style) of a tiny random CLIP saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        PreTrainedTokenizerFast,
    )

    root = tmp_path_factory.mktemp("serve_text")
    clip = root / "clip"
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    ).save_pretrained(clip)
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
    text_config = {
        **tower,
        "vocab_size": len(vocab),
        "max_position_embeddings": 16,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    vision_config = {**tower, "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)

    data = root / "data"
    data.mkdir()
    # the same sentences on other ids in val: an image in two splits is refused
    records = [CaptionRecord(f"{split}{i}", s, split) for split in ("train", "val") for i, s in enumerate(SENTENCES)]
    write_captions(records, data / "captions.jsonl")
    vectors = TextEncoder(str(clip), device="cpu")(SENTENCES)
    write_features(
        data / "features.safetensors",
        {f"{split}{i}": v.clone() for split in ("train", "val") for i, v in enumerate(vectors)},
        {"encoder": str(clip), "kind": "clip-text", "output": "pooled"},
    )
    assert (
        main(
            [
                "train",
                "--out",
                str(root / "run"),
                f"data.captions={data / 'captions.jsonl'}",
                f"data.features={data / 'features.safetensors'}",
                *TINY_MODEL,
            ]
        )
        == 0
    )
    return root / "run", clip


def test_text_conditioned_run_takes_a_sentence(text_run):
    run, clip = text_run
    with TestClient(create_app(run, page=False)) as c:
        assert c.get("/api/health").json()["accepts"] == ["image", "text"]  # CLIP's two towers share a space
        r = c.post("/api/caption", json={"text": "a dog runs on the grass", "seed": 2, "steps": 3})
        assert r.status_code == 200, r.text
        features = TextEncoder(str(clip), device="cpu")(["a dog runs on the grass"])
        expected = CaptionPipeline.from_pretrained(run)(features, seed=2, steps=3).texts[0]
        assert r.json()["caption"] == expected
        multipart = c.post("/api/caption", data={"text": "a dog runs on the grass", "seed": "2", "steps": "3"})
        assert multipart.json()["caption"] == expected
        assert c.post("/api/caption", json={"text": "  "}).json()["error"].startswith("the text is empty")
        assert c.post("/api/caption", json={"text": "x" * 5000}).status_code == 413
        photo = c.post("/api/caption", files={"image": ("a.png", png_bytes(SCENE))})  # through the image tower
        assert photo.status_code == 200 and isinstance(photo.json()["caption"], str)


# ------------------------------------------------------------------------------------------------ the queue


def test_queue_batches_equal_settings_and_refuses_past_its_length():
    calls: list[tuple[str, list]] = []
    release = threading.Event()

    def run_batch(key, items):
        release.wait(5)
        calls.append((key, list(items)))
        return [f"{key}:{item}" for item in items]

    queue = BatchQueue(run_batch, max_batch=3, max_wait_s=0.0, max_queue=5)
    try:
        first = queue.submit("a", 0)  # taken by the worker at once; it then waits for release
        time.sleep(0.1)
        waiting = [queue.submit(key, i) for i, key in enumerate("abab", start=1)]
        waiting.append(queue.submit("a", 5))
        with pytest.raises(QueueFull, match="--max-queue 5"):
            queue.submit("a", 6)
        release.set()
        assert first.result(5) == "a:0"
        assert [f.result(5) for f in waiting] == ["a:1", "b:2", "a:3", "b:4", "a:5"]
        # After the lone first request: the oldest waiting key first, up to max_batch of it, then the rest.
        assert calls == [("a", [0]), ("a", [1, 3, 5]), ("b", [2, 4])]
    finally:
        release.set()
        queue.close()


def test_queue_without_batching_runs_one_request_per_call_and_survives_a_failing_batch():
    def run_batch(key, items):
        if items == ["boom"]:
            raise RuntimeError("the network failed")
        return [len(items)] * len(items)

    queue = BatchQueue(run_batch, max_batch=1, max_wait_s=0.05, max_queue=10)
    try:
        futures = [queue.submit("k", i) for i in range(4)]
        assert [f.result(5) for f in futures] == [1, 1, 1, 1]
        with pytest.raises(RuntimeError, match="the network failed"):
            queue.submit("k", "boom").result(5)
        assert queue.submit("k", 9).result(5) == 1
    finally:
        queue.close()


def test_serve_command_binds_localhost_by_default():
    args = build_parser().parse_args(["serve", "--run", "demo_out/run"])
    assert (args.host, args.port, args.max_batch) == ("127.0.0.1", 7860, 16)
