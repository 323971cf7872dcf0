"""The playground's HTTP API (``deeprnn serve``) through an in-process ASGI client.

Every generation is compared with :func:`deeprnn.generate.generate` on the same checkpoint and seed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from deeprnn import cli  # noqa: E402
from deeprnn.checkpoint import load_checkpoint  # noqa: E402
from deeprnn.errors import ConfigError, DeepRNNError, VocabError  # noqa: E402
from deeprnn.generate import Stopped, generate  # noqa: E402
from deeprnn.serve import INSTALL_HINT, create_app  # noqa: E402
from deeprnn.serve import app as app_module  # noqa: E402

PREFIX = "time traveller"


@pytest.fixture(scope="session")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="session")
def ckpt(run_dir):
    return load_checkpoint(run_dir)


@pytest.fixture(scope="session")
def app(run_dir):
    return create_app(run_dir)


def expected(ckpt, prefix=PREFIX, num_preds=100, **kw):
    return generate(ckpt.model, ckpt.vocab, prefix, num_preds, **kw)


async def _request(app, method, url, **kw):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        return await c.request(method, url, **kw)


def call(app, method, url, **kw) -> httpx.Response:
    return asyncio.run(_request(app, method, url, **kw))


def post(app, body, **kw) -> httpx.Response:
    return call(app, "POST", "/api/generate", json=body, **kw)


EXAMPLE = '{"prefix": "time traveller", "num_preds": 100}'


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# -- generation equals the library --------------------------------------------------------------


@pytest.mark.parametrize("args", [
    dict(strategy="greedy"),
    dict(strategy="greedy", num_samples=2),
    dict(strategy="sample", seed=7),
    dict(strategy="sample", seed=123, temperature=0.7, top_k=5, top_p=0.9, num_samples=3),
    dict(strategy="beam", beam_width=3, num_samples=2),
], ids=["greedy", "greedy-x2", "sample", "sample-filtered-x3", "beam"])
def test_generate_matches_library(app, ckpt, args):
    r = post(app, {"prefix": PREFIX, "num_preds": 60, **args})
    assert r.status_code == 200, r.text
    body = r.json()
    want = expected(ckpt, num_preds=60, **args)
    assert body["samples"] == want
    assert all(s.startswith(PREFIX) for s in body["samples"])
    assert body["model"] == "tiny-lstm" and body["strategy"] == args["strategy"] and body["num_preds"] == 60


def test_sample_without_seed_returns_the_seed_it_used(app, ckpt):
    first = post(app, {"prefix": PREFIX, "num_preds": 40, "strategy": "sample"}).json()
    assert isinstance(first["seed"], int)
    assert first["samples"] == expected(ckpt, num_preds=40, strategy="sample", seed=first["seed"])
    again = post(app, {"prefix": PREFIX, "num_preds": 40, "strategy": "sample", "seed": first["seed"]}).json()
    assert again["samples"] == first["samples"]
    # Below 2**53, so that the page's JSON.parse (a double) shows the seed exactly: a 63-bit seed came back
    # rounded, and typed in again drew other text. (Eight 63-bit draws all fit with probability 2**-80.)
    seeds = [post(app, {"prefix": PREFIX, "num_preds": 1, "strategy": "sample"}).json()["seed"] for _ in range(8)]
    assert all(0 <= s < 2**53 for s in seeds) and len(set(seeds)) == 8


def test_zero_length_returns_the_prefix(app):
    r = post(app, {"prefix": "the", "num_preds": 0})
    assert r.status_code == 200 and r.json()["samples"] == ["the"]


@pytest.mark.filterwarnings("error:prefix characters not in the vocabulary")  # no warning on the server's stderr
def test_unk_replace_feeds_unknown_characters_as_unk(app, ckpt):
    r = post(app, {"prefix": "Time!", "num_preds": 20, "unk": "replace"})
    assert r.status_code == 200, r.text
    assert r.json()["replaced"] == ["T", "!"]  # the answer says which instead
    assert post(app, {"prefix": "time", "num_preds": 2, "unk": "replace"}).json()["replaced"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert r.json()["samples"] == expected(ckpt, prefix="Time!", num_preds=20, unk="replace")


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("patch, field", [
    ({"num_preds": 2001}, "num_preds"),
    ({"num_preds": -1}, "num_preds"),
    ({"num_preds": "ten"}, "num_preds"),
    ({"num_samples": 17}, "num_samples"),
    ({"num_samples": 0}, "num_samples"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"beam_width": 0}, "beam_width"),
    ({"beam_width": 17}, "beam_width"),
    ({"seed": -1}, "seed"),
    ({"strategy": "nucleus"}, "strategy"),
    ({"unk": "ignore"}, "unk"),
    ({"stream": "maybe"}, "stream"),
    ({"prefix": ""}, "prefix"),
    ({"prefix": "a" * 2001}, "prefix"),
    ({"prefix": None}, "prefix"),
    ({"colour": "red"}, "colour"),
    ({"num_preds": True}, "num_preds"),  # were read as 1 and 10 (lax coercion)
    ({"num_preds": "10"}, "num_preds"),
    ({"seed": 1.0}, "seed"),
    ({"strategy": "beam", "beam_width": 4, "num_samples": 5}, "num_samples"),
])
def test_validation_errors_are_422_naming_the_field(app, patch, field):
    body = {"prefix": PREFIX, "num_preds": 10, **patch}
    if patch.get("prefix", "") is None:
        del body["prefix"]
    for stream in (False, True):
        r = post(app, {**body, "stream": stream} if field != "stream" else body)
        assert r.status_code == 422, r.text
        data = r.json()
        assert data["detail"].startswith(field), data
        assert [e["field"] for e in data["errors"]] == [field]


def test_a_prefix_of_spaces_seeds_a_character_model(app, ckpt):
    """Spaces are characters of the vocabulary; such a prefix was refused as blank."""
    r = post(app, {"prefix": "   ", "num_preds": 5, "strategy": "greedy"})
    assert r.status_code == 200, r.text
    assert r.json()["samples"] == expected(ckpt, "   ", 5, strategy="greedy")


def test_an_integer_is_a_valid_temperature(app):
    """Strict types refuse a string or a bool for a number, not a JSON integer where a float is expected."""
    r = post(app, {"prefix": PREFIX, "num_preds": 3, "strategy": "sample", "temperature": 1, "top_p": 1, "seed": 0})
    assert r.status_code == 200, r.text


def test_several_errors_are_all_reported(app):
    r = post(app, {"prefix": PREFIX, "num_preds": 5000, "top_p": 2})
    assert r.status_code == 422
    assert {e["field"] for e in r.json()["errors"]} == {"num_preds", "top_p"}


def test_invalid_json_is_422(app):
    r = call(app, "POST", "/api/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "body"
    assert r.json()["detail"] == ("body is not valid JSON (Expecting property name enclosed in double quotes); send "
                                  f"one object, e.g. {EXAMPLE}")


@pytest.mark.parametrize("body, content_type, status, message", [
    (b'{"prefix": "\xff"}', "application/json", 400,
     f"body is not valid JSON (it must be UTF-8 text holding one object, e.g. {EXAMPLE})"),
    (b"", "application/json", 422, f"body is empty; send a JSON object, e.g. {EXAMPLE}"),
    (b'{"prefix": "time"}', "text/plain", 422,
     "body was not sent as JSON; send it with the header Content-Type: application/json"),
    (b"[1]", "application/json", 422, f"body must be a JSON object, e.g. {EXAMPLE}; got an array"),
    (b'"x"', "application/json", 422, f"body must be a JSON object, e.g. {EXAMPLE}; got a string"),
    (b"null", "application/json", 422, f"body must be a JSON object, e.g. {EXAMPLE}; got null"),
    (b"3", "application/json", 422, f"body must be a JSON object, e.g. {EXAMPLE}; got a number"),
])
def test_a_body_that_is_not_a_json_object_is_named(app, body, content_type, status, message):
    """A body that is not UTF-8 got FastAPI's bare "There was an error parsing the body"; an empty one
    "body: Field required"; text/plain or an array "Input should be a valid dictionary or object…"."""
    r = call(app, "POST", "/api/generate", content=body, headers={"content-type": content_type})
    assert r.status_code == status
    assert r.json() == {"detail": message, "errors": [{"field": "body", "message": message}]}


def test_routing_errors_name_the_request_and_the_api(app):
    """A wrong path or method: one line saying which, and what the API has, in the shape of every other error
    (starlette's bare {"detail": "Not Found"} had no "errors"); a 405 keeps its Allow header."""
    routes = ("the API is GET /api/models, GET /api/model, GET /api/model/curve.png, POST /api/generate and "
              "GET /healthz")
    r = call(app, "GET", "/no-such-page")
    assert (r.status_code, r.json()) == (404, {"detail": f"no such path: /no-such-page; {routes}", "errors": []})
    r = call(app, "GET", "/api/generate")
    assert (r.status_code, r.json()) == (405, {"detail": f"/api/generate does not take GET; {routes}", "errors": []})
    assert r.headers["allow"] == "POST"
    assert call(app, "GET", "/static/no-such-file.js").json()["detail"].startswith("no such path: /static/no-such")


def test_prefix_outside_the_vocabulary_is_reported(app):
    r = post(app, {"prefix": "The Time Machine!", "num_preds": 10})
    assert r.status_code == 422
    data = r.json()
    assert data["errors"] == [{"field": "prefix", "message": data["detail"], "invalid": ["T", "M", "!"]}]
    assert data["detail"].startswith("prefix has characters not in the vocabulary: 'T', 'M', '!'")
    assert data["detail"].endswith(" (the model was trained on 'd2l'-normalised text; normalised so, the prefix is "
                                   "'the time machine': pass that)")
    no_letters = post(app, {"prefix": "!?", "num_preds": 10}).json()  # nothing left to suggest
    assert no_letters["detail"] == "prefix has characters not in the vocabulary: '!', '?'"


def test_unknown_model_is_404(app):
    r = post(app, {"prefix": PREFIX, "model": "nope"})
    assert r.status_code == 404
    assert r.json()["errors"][0]["field"] == "model" and "tiny-lstm" in r.json()["detail"]
    assert call(app, "GET", "/api/model", params={"model": "nope"}).status_code == 404
    assert call(app, "GET", "/api/model/curve.png", params={"model": "nope"}).status_code == 404


def test_body_over_the_limit_is_413(app):
    # By Content-Length: rejected before the body is read.
    r = post(app, {"prefix": "a" * 20_000})
    assert r.status_code == 413 and "16384 bytes" in r.json()["detail"]

    # Streamed without a Content-Length (chunked): counted as it arrives.
    async def chunks():
        for _ in range(20):
            yield b" " * 1000

    r = call(app, "POST", "/api/generate", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413

    # Under the limit, the same path reaches validation.
    r = post(app, {"prefix": "a" * 15_000})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "prefix"

    async def small_body():
        yield json.dumps({"prefix": "the", "num_preds": 3}).encode()

    small = call(app, "POST", "/api/generate", content=small_body(), headers={"content-type": "application/json"})
    assert small.status_code == 200 and small.json()["samples"][0].startswith("the")


# -- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    dict(strategy="sample", seed=5, num_samples=3),
    dict(strategy="greedy"),
    dict(strategy="beam", num_samples=2),
], ids=["sample", "greedy", "beam"])
def test_stream_yields_prefix_then_characters_then_done(app, ckpt, args):
    r = post(app, {"prefix": PREFIX, "num_preds": 80, "stream": True, **args})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    kinds = [e for e, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
    start, done = events[0][1], events[-1][1]
    n = args.get("num_samples", 1)
    assert start["prefix"] == PREFIX and start["num_samples"] == n
    want = expected(ckpt, num_preds=80, **args)
    assert done["samples"] == want
    streamed = [PREFIX] * n
    for kind, data in events[1:-1]:
        streamed[data["i"]] += data["text"]
    assert streamed == want


def test_a_generation_out_of_memory_is_503(app, monkeypatch):
    """generate's memory check (or a failed allocation) was a plain-text 500."""
    import deeprnn.generate as generate_mod

    monkeypatch.setattr(generate_mod, "_free_memory", lambda dev: 1024)
    r = post(app, {"prefix": PREFIX, "strategy": "sample", "num_samples": 16, "num_preds": 2000})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["detail"].startswith("out of memory: 16 samples of 2,000 tokens need at least ")
    assert r.json()["detail"].endswith(" MiB, and cpu has 0.0 MiB free; ask for fewer samples or tokens")


def test_stream_reports_a_failure_as_an_error_event(app, monkeypatch):
    def broken(*_args, **_kw):
        raise VocabError("the model predicts 30 tokens but the vocabulary has 28; use the vocabulary saved with it")

    monkeypatch.setattr(app_module, "_run", broken)
    events = sse_events(post(app, {"prefix": PREFIX, "stream": True}).text)
    assert [e for e, _ in events] == ["start", "error"]
    assert events[1][1]["detail"].startswith("the model predicts 30 tokens")


def raw_post(app, body: dict, leave: threading.Event, *, on_send=None) -> list[dict]:
    """``POST /api/generate`` straight through ASGI, from a client that hangs up once ``leave`` is set (by
    the test, a worker, or ``on_send(sent)`` after each message); returns the messages the app sent."""
    data = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/api/generate", "raw_path": b"/api/generate",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("test", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]}

    async def scenario():
        sent = []
        pending = [{"type": "http.request", "body": data, "more_body": False}]

        async def receive():
            if pending:
                return pending.pop()
            while not leave.is_set():
                await asyncio.sleep(0.002)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if on_send is not None:
                on_send(sent)

        await asyncio.wait_for(app(scope, receive, send), 10)
        return sent

    return asyncio.run(scenario())


def wait_until_idle(pool) -> None:
    deadline = time.monotonic() + 5
    while pool.admitted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.admitted == 0


def test_stream_stops_its_worker_when_the_client_leaves(run_dir, monkeypatch):
    small = create_app(run_dir, workers=1, max_queue=0)
    stopped = threading.Event()

    def endless(entry, prefix, num_preds, args, on_text, gone):
        while not gone.is_set():
            on_text(0, "a")
            time.sleep(0.001)
        stopped.set()
        raise Stopped("generation stopped after some tokens")

    monkeypatch.setattr(app_module, "_run", endless)
    leave = threading.Event()

    def hang_up_after_the_first_characters(sent):
        if len(sent) == 3:  # response start, start event, first characters
            leave.set()

    sent = raw_post(small, {"prefix": "the", "stream": True}, leave, on_send=hang_up_after_the_first_characters)
    assert sent[0]["status"] == 200 and sent[1]["body"].startswith(b"event: start")
    assert stopped.wait(5), "the worker kept generating for a client that had left"
    wait_until_idle(small.state.pool)
    small.state.pool.shutdown()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_beam_search_stops_when_its_client_leaves(run_dir, monkeypatch, stream):
    """Beam search tells nothing until its end, streamed or not: the worker stops before its next token
    once the client hangs up, instead of decoding 2,000 tokens x 16 beams for nobody."""
    small = create_app(run_dir, workers=1, max_queue=0)
    real_run, leave, looks, stopped = app_module._run, threading.Event(), [], []

    class Watched:  # the handler's event, seen by the real generate: the client leaves at the 5th token
        def __init__(self, gone):
            self.gone = gone

        def is_set(self):
            looks.append(1)
            if len(looks) == 5:
                leave.set()
                assert self.gone.wait(5), "the handler did not notice the client leave"
            return self.gone.is_set()

    def watched(entry, prefix, num_preds, args, on_text, gone):
        try:
            return real_run(entry, prefix, num_preds, args, on_text, Watched(gone))
        except Stopped as e:
            stopped.append(str(e))
            raise

    monkeypatch.setattr(app_module, "_run", watched)
    body = {"prefix": PREFIX, "num_preds": 2000, "strategy": "beam", "beam_width": 16, "stream": stream}
    sent = raw_post(small, body, leave)
    wait_until_idle(small.state.pool)
    assert stopped == ["generation stopped after 4 tokens"] and len(looks) == 5
    if stream:  # the response had started; nothing after the start event
        assert [m.get("status") for m in sent[:1]] == [200] and b"event: done" not in b"".join(
            m.get("body", b"") for m in sent)
    else:
        assert sent[0]["status"] == 499
    small.state.pool.shutdown()


def test_a_queued_request_whose_client_leaves_never_runs(run_dir, monkeypatch):
    small = create_app(run_dir, workers=1, max_queue=1)
    release, busy, ran = threading.Event(), threading.Event(), []

    def slow(entry, prefix, num_preds, args, on_text, gone):
        ran.append(prefix)
        busy.set()
        assert release.wait(10), "test never released the worker"
        return [prefix] * args["num_samples"], 0.5

    monkeypatch.setattr(app_module, "_run", slow)
    first = threading.Thread(target=call, args=(small, "POST", "/api/generate"), kwargs={"json": {"prefix": "the"}})
    first.start()
    assert busy.wait(10)
    leave = threading.Event()

    def hang_up_once_queued():
        while small.state.pool.admitted < 2:
            time.sleep(0.005)
        leave.set()

    threading.Thread(target=hang_up_once_queued).start()
    sent = raw_post(small, {"prefix": "my dear"}, leave)
    assert sent[0]["status"] == 499
    assert small.state.pool.admitted == 1  # the queued one left the line at once
    release.set()
    first.join(10)
    wait_until_idle(small.state.pool)
    assert ran == ["the"]
    small.state.pool.shutdown()


# -- concurrency ----------------------------------------------------------------------------------


def test_parallel_requests_are_independent(app, ckpt):
    """200 requests, 8 in flight at a time, mixed strategies/lengths; each equals its library result."""
    reqs = []
    for k in range(200):
        body = {"prefix": ["time traveller", "the", "my dear"][k % 3], "num_preds": 10 + k % 37,
                "strategy": "sample", "seed": 1000 + k, "num_samples": 1 + k % 3, "temperature": 0.8}
        if k % 10 == 3:
            body = {"prefix": body["prefix"], "num_preds": body["num_preds"], "strategy": "greedy"}
        body["stream"] = k % 5 == 0
        reqs.append(body)
    want = [expected(ckpt, **{k: v for k, v in b.items() if k != "stream"}) for b in reqs]

    async def run_all():
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            async def one(body):
                async with sem:
                    return await c.post("/api/generate", json=body)
            return await asyncio.gather(*(one(b) for b in reqs))

    responses = asyncio.run(run_all())
    assert [r.status_code for r in responses] == [200] * 200
    got = [sse_events(r.text)[-1][1]["samples"] if b["stream"] else r.json()["samples"]
           for b, r in zip(reqs, responses)]
    for k, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {k} ({reqs[k]}) differs from the library"
    assert app.state.pool.admitted == 0


def test_full_queue_answers_503(run_dir, monkeypatch):
    small = create_app(run_dir, workers=1, max_queue=1)
    release = threading.Event()
    started = threading.Event()

    def slow(entry, prefix, num_preds, args, on_text, gone):
        started.set()
        assert release.wait(10), "test never released the worker"
        return [prefix + "x" * num_preds] * args["num_samples"], 0.5  # the samples, and the seconds decoding took

    monkeypatch.setattr(app_module, "_run", slow)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=small), base_url="http://test") as c:
            body = {"prefix": "the", "num_preds": 4}
            running = asyncio.create_task(c.post("/api/generate", json=body))
            queued = asyncio.create_task(c.post("/api/generate", json=body))
            while small.state.pool.admitted < 2:
                await asyncio.sleep(0.01)
            rejected = await c.post("/api/generate", json=body)
            rejected_stream = await c.post("/api/generate", json={**body, "stream": True})
            health = await c.get("/healthz")  # the event loop is not blocked by the workers
            release.set()
            return rejected, rejected_stream, health, await running, await queued

    rejected, rejected_stream, health, running, queued = asyncio.run(scenario())
    assert started.is_set()
    for r in (rejected, rejected_stream):
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["detail"].startswith("server busy")
    assert health.status_code == 200 and health.json()["admitted"] == 2
    assert running.status_code == queued.status_code == 200
    assert running.json()["samples"] == ["thexxxx"]
    # tokens per second of decoding, not of the request: the queued one waited as long as the first decoded
    assert running.json()["tokens_per_s"] == queued.json()["tokens_per_s"] == 4 / 0.5
    assert small.state.pool.admitted == 0
    small.state.pool.shutdown()


def test_tokens_per_second_count_the_streams_decoded():
    """Greedy decoding computes one stream however many copies are asked for; sampling one per sample; a beam
    search beam_width. (The copies of a greedy text used to count as decoded tokens.)"""
    def rate(**kw):
        return app_module._timing(app_module.GenerateRequest(prefix="the", num_preds=100, **kw), 9.0, 0.5)

    assert rate(strategy="greedy", num_samples=3) == {"elapsed_s": 9.0, "tokens_per_s": 200.0}
    assert rate(strategy="sample", num_samples=3) == {"elapsed_s": 9.0, "tokens_per_s": 600.0}
    assert rate(strategy="beam", num_samples=2, beam_width=8) == {"elapsed_s": 9.0, "tokens_per_s": 1600.0}


# -- model card, page, schema ---------------------------------------------------------------------


def test_model_card(app, ckpt, run_dir):
    card = call(app, "GET", "/api/model").json()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert card["id"] == "tiny-lstm"
    assert (card["cell"], card["num_layers"], card["num_hiddens"]) == ("lstm", 1, 16)
    assert card["parameters"] == sum(p.numel() for p in ckpt.model.parameters()) == summary["parameters"]
    assert card["corpus"] == ["timemachine"] and card["vocab_size"] == 28
    assert card["test_ppl"] == pytest.approx(summary["test_ppl"])
    assert card["test_bpc"] == pytest.approx(summary["test_bpc"])
    assert card["valid_ppl"] == pytest.approx(ckpt.meta["metrics"]["val_ppl"])
    assert card["vocabulary"] == " abcdefghijklmnopqrstuvwxyz"
    png = call(app, "GET", card["curve_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == (run_dir / "curve.png").read_bytes()
    listing = call(app, "GET", "/api/models").json()
    assert listing["default"] == "tiny-lstm" and listing["models"] == [card]


def test_health_page_static_and_openapi(app):
    health = call(app, "GET", "/healthz").json()
    assert health["status"] == "ok" and health["models"] == 1
    page = call(app, "GET", "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        r = call(app, "GET", asset)
        assert r.status_code == 200
        # Works offline: nothing is fetched from another host.
        assert "http://" not in r.text and "https://" not in r.text
    assert "http://" not in page.text and "https://" not in page.text
    assert call(app, "GET", "/docs").status_code == 404  # its UI would come from a CDN: off
    schema = call(app, "GET", "/openapi.json").json()
    assert {"/api/generate", "/api/model", "/api/models", "/healthz"} <= set(schema["paths"])
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["num_preds"]["maximum"] == 2000 and props["num_samples"]["maximum"] == 16


def test_runs_directory_offers_every_run(run_dir, ckpt, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "lstm-a")
    shutil.copytree(run_dir, runs / "sweep" / "lstm-b")
    (runs / "broken" / "best").mkdir(parents=True)
    (runs / "broken" / "best" / "checkpoint.json").write_text("not json")
    (runs / "notes").mkdir()
    multi = create_app(runs)
    listing = call(multi, "GET", "/api/models").json()
    assert [m["id"] for m in listing["models"]] == ["lstm-a", "sweep/lstm-b"]
    assert listing["default"] == "lstm-a"
    assert [s["path"] for s in listing["skipped"]] == [str(runs / "broken")]
    card = call(multi, "GET", "/api/model", params={"model": "sweep/lstm-b"}).json()
    assert call(multi, "GET", card["curve_url"]).status_code == 200
    r = post(multi, {"prefix": "the", "num_preds": 30, "model": "sweep/lstm-b", "strategy": "sample", "seed": 2})
    assert r.json()["model"] == "sweep/lstm-b"
    assert r.json()["samples"] == expected(ckpt, prefix="the", num_preds=30, strategy="sample", seed=2)
    # A checkpoint directory itself, and the same run twice: ids stay unique.
    both = create_app([run_dir / "best", run_dir])
    assert [m["id"] for m in call(both, "GET", "/api/models").json()["models"]] == ["tiny-lstm/best", "tiny-lstm"]


def train_small(path, **kw):
    """Another tiny run, unlike the shared one (8 units): 'retrained' where it replaces a checkpoint."""
    from deeprnn.train import TrainConfig, train

    cfg = dict(num_layers=1, num_hiddens=8, batch_size=4, num_steps=8, max_tokens=2000, max_steps=2,
               eval_batch_size=4, sample_every=0, precision="fp32", run_dir=str(path))
    train(TrainConfig(**{**cfg, **kw}), progress=False, log=lambda *_: None)
    return path


def listed(app) -> list[str]:
    return [m["id"] for m in call(app, "GET", "/api/models").json()["models"]]


def test_runs_trained_retrained_or_removed_while_serving_are_seen(run_dir, tmp_path, monkeypatch, caplog):
    """A request ``rescan`` seconds after the last look looks again (here: every request): a run trained
    since is offered, a retrained one reloaded, a removed one dropped; the others stay as loaded."""
    monkeypatch.setenv("DEEPRNN_OFFLINE", "1")
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "a")
    other = train_small(tmp_path / "other")
    live = create_app(runs, rescan=1e-9)
    frozen = create_app(runs, rescan=0)
    assert listed(live) == listed(frozen) == ["a"]
    first_a = live.state.registry.get("a")

    shutil.copytree(other, runs / "b")  # a run trained since the server started
    caplog.set_level("INFO", logger="deeprnn.serve")
    assert listed(live) == ["a", "b"] and listed(frozen) == ["a"]
    assert live.state.registry.get("a") is first_a  # unchanged: not loaded again
    body = {"prefix": PREFIX, "model": "b", "strategy": "sample", "seed": 5, "num_preds": 30}
    want = generate(load_checkpoint(other).model, load_checkpoint(other).vocab, PREFIX, 30, strategy="sample", seed=5)
    assert post(live, body).json()["samples"] == want
    assert post(frozen, body).status_code == 404

    old_curve = call(live, "GET", "/api/model", params={"model": "a"}).json()["curve_url"]
    shutil.rmtree(runs / "a" / "best")  # retrained: a save replaces the folder whole, and the curve is redrawn
    shutil.copytree(other / "best", runs / "a" / "best")
    shutil.copy(other / "curve.png", runs / "a" / "curve.png")
    card = call(live, "GET", "/api/model", params={"model": "a"}).json()
    assert card["num_hiddens"] == 8 and call(frozen, "GET", "/api/model").json()["num_hiddens"] == 16
    assert card["curve_url"] != old_curve  # a new address: no browser holds the old curve under it
    assert call(live, "GET", card["curve_url"]).content == (other / "curve.png").read_bytes()
    assert post(live, {**body, "model": "a"}).json()["samples"] == want

    shutil.rmtree(runs / "b")
    (runs / "c" / "best").mkdir(parents=True)
    (runs / "c" / "best" / "checkpoint.json").write_text("{")  # a run being written, or broken: skipped
    listing = call(live, "GET", "/api/models").json()
    assert [m["id"] for m in listing["models"]] == ["a"]
    assert [s["path"] for s in listing["skipped"]] == [str(runs / "c")]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"added model b from {runs / 'b' / 'best'}"
    assert f"reloaded model a from {runs / 'a' / 'best'}" in messages
    assert f"dropped model b ({runs / 'b'}): its run is gone" in messages
    listed(live)  # c is tried again at each look (it may be being written), and warned about once
    assert sum("skipping" in r.getMessage() and str(runs / "c") in r.getMessage() for r in caplog.records) == 1

    shutil.rmtree(runs / "a")  # nothing left to serve: what is loaded stays
    assert listed(live) == ["a"] and post(live, {**body, "model": "a"}).json()["samples"] == want
    assert caplog.records[-1].getMessage().startswith("keeping the models loaded: ")
    for app in (live, frozen):
        app.state.pool.shutdown()


@pytest.mark.parametrize("how", ["overwrite", "removed"])
def test_a_run_named_directly_keeps_its_model_while_it_is_rewritten(run_dir, tmp_path, caplog, how):
    """``train --overwrite`` of a served run removes its checkpoints and files, not its directory, for a while:
    it is served as loaded (it was dropped when another path was served beside it), with one warning."""
    caplog.set_level("WARNING", logger="deeprnn.serve")  # whatever an earlier test left on the "deeprnn" logger
    run, other = tmp_path / "a", tmp_path / "b"
    shutil.copytree(run_dir, run)
    shutil.copytree(run_dir, other)
    live = create_app([run, other], rescan=1e-9)
    card = call(live, "GET", "/api/model").json()
    if how == "overwrite":
        for name in ("best", "last", "summary.json", "curve.png", "metrics.csv", "config.json"):
            (shutil.rmtree if (run / name).is_dir() else os.remove)(run / name)
    else:
        shutil.rmtree(run)
    for _ in range(3):
        assert call(live, "GET", "/api/model").json() == card
    assert listed(live) == ["a", "b"] and post(live, {"prefix": PREFIX, "num_preds": 5}).status_code == 200
    reason = (f"{run} holds no deeprnn checkpoint (no checkpoint.json in it, nor in best/ or last/)"
              if how == "overwrite" else f"no such run or checkpoint: {run}")
    assert [r.getMessage() for r in caplog.records] == [f"keeping model a as loaded: {reason}"]  # once
    live.state.pool.shutdown()


def test_a_runs_card_follows_its_summary_and_curve(run_dir, tmp_path):
    """A run found while it trains shows its test score and final curve once they are written (after the
    last save of its checkpoint), with a new curve address."""
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "a")
    (runs / "a" / "summary.json").rename(tmp_path / "summary.json")
    (runs / "a" / "curve.png").rename(tmp_path / "curve.png")
    live = create_app(runs, rescan=1e-9)
    card = call(live, "GET", "/api/model").json()
    assert card["test_ppl"] is None and card["curve_url"] is None
    (tmp_path / "summary.json").rename(runs / "a" / "summary.json")
    (tmp_path / "curve.png").rename(runs / "a" / "curve.png")
    card = call(live, "GET", "/api/model").json()
    assert card["test_ppl"] == pytest.approx(json.loads((run_dir / "summary.json").read_text())["test_ppl"])
    assert call(live, "GET", card["curve_url"]).content == (run_dir / "curve.png").read_bytes()
    live.state.pool.shutdown()


def test_a_broken_checkpoint_is_warned_about_once_and_an_unreadable_run_skipped(run_dir, tmp_path, caplog,
                                                                               monkeypatch):
    caplog.set_level("WARNING", logger="deeprnn.serve")  # whatever an earlier test left on the "deeprnn" logger
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "a")
    live = create_app(runs, rescan=1e-9)
    card = call(live, "GET", "/api/model").json()
    meta = runs / "a" / "best" / "checkpoint.json"
    meta.write_text("{")  # damaged while served: the loaded model stays, one warning for this state of the file
    for _ in range(3):
        assert call(live, "GET", "/api/model").json() == card
    assert [r.getMessage() for r in caplog.records] == [
        f"keeping model a as loaded: {meta} is not a deeprnn checkpoint (not valid JSON); it may be corrupt or a "
        "file from another program (pickles are never loaded)"]

    shutil.copytree(run_dir, runs / "b")
    shutil.copytree(run_dir, runs / "locked")
    real = app_module.resolve_checkpoint

    def no_access(path, *a, **k):  # what a directory this user cannot read gives (tests run as root)
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(app_module, "resolve_checkpoint", no_access)
    assert listed(live) == ["a", "b"]  # a traceback at every look before, and b never offered
    assert caplog.records[-1].getMessage() == f"skipping {runs / 'locked'}: [Errno 13] Permission denied: " \
                                              f"'{runs / 'locked'}'"
    live.state.pool.shutdown()


def test_a_models_id_stays_while_it_is_served(run_dir, tmp_path):
    """Two directories each holding a run ``x`` offer ``x`` and ``x-2``. When the first goes, the second stays
    ``x-2`` (the same model, not loaded again), so a page's choice keeps meaning the same run; when the first
    comes back it is ``x`` again."""
    for root in ("one", "two"):
        shutil.copytree(run_dir, tmp_path / root / "x")
    live = create_app([tmp_path / "one", tmp_path / "two"], rescan=1e-9)
    assert listed(live) == ["x", "x-2"]
    second = live.state.registry.get("x-2")
    shutil.rmtree(tmp_path / "one" / "x")
    assert listed(live) == ["x-2"] and live.state.registry.get("x-2") is second
    assert call(live, "GET", "/api/model", params={"model": "x"}).status_code == 404
    shutil.copytree(run_dir, tmp_path / "one" / "x")
    assert listed(live) == ["x", "x-2"] and live.state.registry.get("x-2") is second
    assert call(live, "GET", second.card["curve_url"]).status_code == 200
    live.state.pool.shutdown()


@pytest.mark.parametrize("rescan", [-1, float("nan"), float("inf"), "5", True])
def test_rescan_must_be_seconds(run_dir, rescan):
    with pytest.raises(ConfigError, match=re.escape(
            f"rescan must be a number of seconds >= 0 (0: load the models once), got {rescan!r}")):
        create_app(run_dir, rescan=rescan)


def test_paths_without_a_model_are_rejected(tmp_path):
    with pytest.raises(DeepRNNError, match="holds no deeprnn run or checkpoint"):
        create_app(tmp_path)
    with pytest.raises(DeepRNNError, match="no such run or checkpoint"):
        create_app(tmp_path / "missing")
    with pytest.raises(ValueError, match="^max_queue"):
        create_app(tmp_path, max_queue=-1)


# -- the command line -----------------------------------------------------------------------------


def test_cli_registers_serve(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "RUN_OR_CHECKPOINT_OR_RUNS_DIR" in out and "--port" in out and "127.0.0.1" in out


def test_cli_without_fastapi_says_how_to_install(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    assert cli.main(["serve", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"deeprnn: error: {INSTALL_HINT}" and "pip install 'deeprnn[serve]'" in err

    monkeypatch.delitem(sys.modules, "deeprnn.serve.app")
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(DeepRNNError, match=r"pip install 'deeprnn\[serve\]'"):
        create_app(run_dir)


@pytest.fixture
def no_server(monkeypatch):
    """uvicorn.run replaced by a failure: a command that should have stopped before it cannot start a server."""
    uvicorn = pytest.importorskip("uvicorn")

    def run(*_a, **_k):
        raise AssertionError("the server was started")

    monkeypatch.setattr(uvicorn, "run", run)


def _serve_error(capsys, argv) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1, err
    return code, err.strip()


@pytest.mark.parametrize("device, message", [
    ("cuda", "device 'cuda' requested but CUDA is not available; use --device cpu or auto"),
    ("mps", "device 'mps' requested but MPS is not available; use --device cpu or auto"),
    ("foo", "device must be auto, cpu, cuda, cuda:N or mps, got 'foo'"),
    # torch parses these, and they failed later: xpu at start-up, meta in autocast (a traceback each)
    ("xpu", "device must be auto, cpu, cuda, cuda:N or mps, got 'xpu'"),
    ("meta", "device must be auto, cpu, cuda, cuda:N or mps, got 'meta'"),
])
def test_cli_unavailable_device_is_one_line(run_dir, no_server, capsys, device, message):
    """The check train, generate and evaluate make (serve used to end in a torch traceback)."""
    import torch

    if (device == "cuda" and torch.cuda.is_available()) or (device == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"this machine has {device}")
    assert _serve_error(capsys, ["serve", str(run_dir), "--device", device]) == (2, f"deeprnn: error: {message}")
    with pytest.raises(DeepRNNError, match=f"^{re.escape(message)}$"):
        create_app(run_dir, device=device)


def test_the_servers_own_lines_reach_stderr(capsys):
    """``added model …`` and the warnings were logged to a logger nobody configured: INFO was lost."""
    import logging

    from deeprnn.serve import log_to_stderr

    logger = logging.getLogger("deeprnn.serve")
    handler = log_to_stderr("info")
    try:
        assert log_to_stderr("info") is handler  # once
        logger.info("added model b from runs/b/best")
        logger.warning("skipping runs/c: no checkpoint")
        logger.debug("not shown at info")
        assert capsys.readouterr().err.splitlines() == [
            "deeprnn serve: added model b from runs/b/best", "deeprnn serve: warning: skipping runs/c: no checkpoint"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


@pytest.mark.parametrize("seconds", ["-1", "nan", "inf"])
def test_cli_rescan_out_of_range_is_one_line(run_dir, no_server, capsys, seconds):
    assert _serve_error(capsys, ["serve", str(run_dir), "--rescan", seconds]) == (
        2, f"deeprnn: error: --rescan must be a number of seconds >= 0 (0: load the models once), got {float(seconds)}")


@pytest.mark.parametrize("port", ["99999", "-1", "0", "http"])
def test_cli_port_out_of_range_is_a_usage_error(run_dir, no_server, capsys, port):
    code, line = _serve_error(capsys, ["serve", str(run_dir), "--port", port])
    assert code == 2
    assert line == (f"deeprnn serve: error: argument --port: must be a TCP port number from 1 to 65535, got {port!r} "
                    "(see deeprnn serve --help)")


def test_cli_port_in_use_is_one_line_before_starting(run_dir, no_server, capsys):
    """A taken port: one line naming it, exit 2, before any model is loaded or the URL is printed (it used to
    print the URL and uvicorn's startup lines, then exit 3). The check does not keep the port."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, line = _serve_error(capsys, ["serve", str(run_dir), "--port", str(port)])
    assert code == 2
    assert line == (f"deeprnn: error: port {port} on 127.0.0.1 is already in use; choose another with --port, "
                    f"e.g. --port {port + 1}")
    from deeprnn.serve import check_port_free

    check_port_free("127.0.0.1", port)  # free again once its owner closed it


def test_core_package_does_not_import_fastapi():
    code = ("import sys, deeprnn, deeprnn.generate, deeprnn.serve, deeprnn.cli; deeprnn.cli.build_parser(); "
            "bad = [m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
