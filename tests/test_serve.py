"""``esparse serve`` on a tiny random LLaMA export (CPU, fp32): the official openai client against the server,
continuous batching that does not change greedy tokens, every bad request a clean 4xx, disconnects, a full
queue, timeouts, engine failures, no KV row left behind, SIGTERM drain.

The tiny model is initialized with a wide weight spread (initializer_range 0.3) so that its logits are far
apart: greedy tokens then depend on the prompt and position (not one repeated token) and no greedy step is a
near tie (the batching test checks this premise: the smallest top-2 logit gap over its steps is ~1e-3, against
~1e-6 of fp32 rounding that differs between batch sizes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from openai import APIError, AsyncOpenAI, BadRequestError, OpenAI

from esparse.cli import main
from esparse.python_api import load_decoder
from esparse.python_api.generate import generate
from esparse.python_api.serve.engine import Engine, EngineConfig, SamplingParams, batch_buckets
from esparse.python_api.serve.metrics import ServeMetrics
from esparse.python_api.serve.scheduler import QueueFull, Scheduler, Sequence, SlotPool
from esparse.python_api.serve.server import ServerThread, create_app
from esparse.python_api.serve.text import Detokenizer, StopMatcher, TextCodec

from helpers import save_model

NAME = "tiny"
EOS = 2
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(export folder, fp32 CPU decoder, codec) of a tiny LLaMA (GQA) with a chat template."""
    root = tmp_path_factory.mktemp("serve")
    src = save_model("llama", root / "src", initializer_range=0.3)
    (src / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert main(["export", str(src), "--out", str(root / "ft"), "--dtype", "fp32"]) == 0
    model = load_decoder(root / "ft", device="cpu", dtype=torch.float32)
    codec = TextCodec.from_folder(root / "ft", model.cfg.end_id)
    assert codec.eos_ids == {EOS} and codec.has_chat_template
    return root / "ft", model, codec


class SlowModel:
    """The decoder with a pause before every call: long enough generations for cancellation, queue and timeout
    tests to act while a request is still running, whatever the machine's speed."""

    def __init__(self, model, pause: float = 0.02, fail_on: int | None = None):
        self._model, self._pause, self._fail_on = model, pause, fail_on

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, ids, cache, start, **kw):
        if self._fail_on is not None and int(ids[0, 0]) == self._fail_on:
            raise RuntimeError("injected failure")
        time.sleep(self._pause)
        return self._model(ids, cache, start, **kw)


@contextlib.contextmanager
def serving(model, codec, request_timeout: float = 60.0, **cfg):
    cfg.setdefault("max_len", 128)
    metrics = ServeMetrics(cfg.get("max_batch", 8))
    engine = Engine(model, EngineConfig(**cfg), codec.eos_ids, metrics)
    app = create_app(engine, codec, NAME, metrics, request_timeout=request_timeout)
    with ServerThread(app) as srv:
        yield srv, engine
    assert not engine.alive


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name + (('{' + labels + '}') if labels else ''))} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


def idle(url: str) -> bool:
    return all(metric(url, n) == 0 for n in ("esparse_kv_slots_used", "esparse_running_requests",
                                             "esparse_waiting_requests"))


def healthy(url: str) -> None:
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def post(url: str, path: str, body, timeout: float = 30.0) -> httpx.Response:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"Content-Type": "application/json"}, timeout=timeout)


def is_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    return err


# ---- text and slots, no server ----------------------------------------------------------------------------------
def test_stop_matcher_holds_back_a_possible_stop_and_cuts_before_it():
    m = StopMatcher(["END", "xy"])
    assert m.feed("abc E") == ("abc ", False)  # "E" may start END
    assert m.feed("N") == ("", False)
    assert m.feed("Dzz") == ("", True)  # END complete: nothing of it is emitted
    m = StopMatcher(["END"])
    assert m.feed("EN") == ("", False)
    assert m.feed("o") == ("ENo", False)  # not a stop after all: released
    assert m.feed("x") == ("x", False) and m.flush() == ""
    assert StopMatcher([]).feed("END") == ("END", False)


def test_detokenizer_streams_the_text_of_the_whole_sequence(tiny):
    _, _, codec = tiny
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        prompt = torch.randint(3, 300, (5,), generator=g).tolist()
        ids = torch.randint(3, 300, (30,), generator=g).tolist()
        d = Detokenizer(codec.tokenizer, prompt)
        text = "".join(d.add(t) for t in ids) + d.flush()
        assert text == codec.tokenizer.decode(ids, skip_special_tokens=True)
    assert Detokenizer(None, [1]).add(42) == " 42"


def test_slots_lowest_free_and_buckets():
    pool = SlotPool(4)
    assert [pool.take() for _ in range(3)] == [0, 1, 2] and pool.high_water() == 3
    pool.give(1)
    assert pool.high_water() == 3 and pool.take() == 1  # a hole is refilled first
    pool.give(2)
    assert pool.high_water() == 2 and pool.in_use == 2
    assert batch_buckets(1) == [1] and batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]


def test_admission_keeps_the_prefill_budget_and_the_queue_bound():
    sch = Scheduler(max_batch=2, max_queue=1, prefill_budget=10)
    seqs = [Sequence([1] * n, SamplingParams(4), lambda ev: None) for n in (12, 8, 3, 5)]
    for s in seqs[:3]:  # two fit the free rows, the third is the one allowed to wait beyond them
        sch.submit(s)
    with pytest.raises(QueueFull):
        sch.submit(seqs[3])
    assert sch.admit() == [seqs[0]]  # 12 tokens, over the budget, but one is always admitted
    assert sch.admit() == [seqs[1]] and sch.admit() == []  # no free row for the third
    sch.release(seqs[0])
    assert sch.admit() == [seqs[2]] and seqs[2].slot == 0 and sch.counts() == (0, 2, 2)


@pytest.mark.parametrize("arch", ["opt"])
def test_engine_rows_are_independent_as_sequences_come_and_go(arch, tmp_path):
    """Engine alone (stepped by hand, no thread): 7 sequences through 3 rows, joining holes left by shorter ones,
    each gets its served-alone greedy tokens; seeded sampling gives the same tokens alone and in a batch."""
    src = save_model(arch, tmp_path / "src", init_std=0.3)
    assert main(["export", str(src), "--out", str(tmp_path / "ft"), "--dtype", "fp32"]) == 0
    model = load_decoder(tmp_path / "ft", device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in (5, 17, 3, 9, 30, 2, 12)]
    lens = [6, 3, 12, 9, 4, 15, 7]
    engine = Engine(model, EngineConfig(max_batch=3, max_len=64))
    got: dict[int, list[int]] = {}

    def sink_for(i):
        return lambda ev: got.setdefault(i, []).append(ev.token)

    for i, (p, n) in enumerate(zip(prompts, lens)):
        engine.submit(p, SamplingParams(max_tokens=n), sink_for(i))
    for _ in range(200):
        if not any(engine.scheduler.counts()):
            break
        engine.iteration()
    assert engine.scheduler.peak_running == 3 and engine.scheduler.slots.in_use == 0
    for i, (p, n) in enumerate(zip(prompts, lens)):
        assert got[i] == generate(model, [p], n)[0], i

    def sampled(others: int) -> list[int]:
        eng = Engine(model, EngineConfig(max_batch=4, max_len=64))
        out: list[int] = []
        eng.submit(prompts[0], SamplingParams(max_tokens=10, temperature=1.0, seed=11), lambda ev: out.append(ev.token))
        for p in prompts[1:1 + others]:
            eng.submit(p, SamplingParams(max_tokens=10, temperature=0.7, seed=5), lambda ev: None)
        while any(eng.scheduler.counts()):
            eng.iteration()
        return out

    assert sampled(0) == sampled(3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_batch_buckets_give_the_served_alone_tokens(tiny, device):
    """Decode steps run per batch bucket over rows 0..bucket-1 of one shared cache (on a GPU: the compiled step
    replayed from per-bucket CUDA graphs; on the CPU the same bucket steps run eagerly, which checks the bucket
    choice and the dummy rows): 12 sequences through 4 rows, buckets 4, 2 and 1 all used as rows come and go,
    each get the greedy tokens of generate() alone, eager (fp32: only fusion-level rounding may differ, and the
    steps are not near ties)."""
    ft, _, _ = tiny
    model = load_decoder(ft, device=device, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 300, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(12)]
    lens = [40, 20, 3, 5, 2, 4, 3, 6, 2, 3, 4, 3]  # rows 0 and 1 outlive the others: buckets 4, then 2, then 1
    want = [generate(model, [p], n)[0] for p, n in zip(prompts, lens)]
    engine = Engine(model, EngineConfig(max_batch=4, max_len=128))
    if device == "cpu":
        engine._buckets = batch_buckets(4)
        engine._graphs = {b: _EagerStep(model, engine.cache.rows(0, b)) for b in engine._buckets}
    assert sorted(engine._graphs) == [1, 2, 4]
    used, got = set(), {}
    engine._graphs = {b: _Recorder(step, b, used) for b, step in engine._graphs.items()}
    for i, (p, n) in enumerate(zip(prompts, lens)):
        engine.submit(p, SamplingParams(max_tokens=n), lambda ev, i=i: got.setdefault(i, []).append(ev.token))
    for _ in range(500):
        if not any(engine.scheduler.counts()):
            break
        engine.iteration()
    assert used == {1, 2, 4} and engine.scheduler.slots.in_use == 0
    assert [got[i] for i in range(12)] == want


class _EagerStep:
    """What a captured GraphDecodeStep computes, run eagerly: one decode step over a fixed rows() view."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def __call__(self, ids, start):
        return self.model(ids, self.cache, start)


class _Recorder:
    """A bucket's step that notes that it ran."""

    def __init__(self, fn, bucket: int, used: set):
        self.fn, self.bucket, self.used = fn, bucket, used

    def __call__(self, ids, start):
        self.used.add(self.bucket)
        return self.fn(ids, start)


# ---- the server -------------------------------------------------------------------------------------------------
def test_openai_client_completions_chat_and_streaming(tiny):
    _, model, codec = tiny
    with serving(model, codec) as (srv, _):
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [NAME]
        prompt = "The quick brown fox"
        ids = codec.encode(prompt)
        want = generate(model, [ids], 12, eos_id=EOS)[0]
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"return_token_ids": True})
        choice = r.choices[0]
        assert choice.model_extra["token_ids"] == want
        assert choice.text == codec.tokenizer.decode(want, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if want[-1] == EOS else "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
        # the same as token ids, and streamed: the chunks add up to the same text, then a usage chunk
        chunks = list(client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
        # a stop string: the text ends right before its first occurrence
        full = client.completions.create(model=NAME, prompt=ids, max_tokens=30, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
        stop = next(full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if "\ufffd" not in full[i:i + 2])
        r = client.completions.create(model=NAME, prompt=ids, max_tokens=30, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
        streamed = client.completions.create(model=NAME, prompt=ids, max_tokens=30, temperature=0, stop=stop,
                                             stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]
        # chat: the exported template renders the prompt; streamed deltas add up to the message
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Sparse matrices?"}]
        chat_ids = codec.chat_prompt(messages)
        assert codec.tokenizer.decode(chat_ids).startswith("<s>system: be brief</s>")
        want = generate(model, [chat_ids], 10, eos_id=EOS)[0]
        r = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=10, temperature=0)
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == codec.tokenizer.decode(want, skip_special_tokens=True)
        assert r.usage.prompt_tokens == len(chat_ids)
        deltas = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                     stream=True))
        assert deltas[0].choices[0].delta.role == "assistant"
        assert "".join(d.choices[0].delta.content or "" for d in deltas) == r.choices[0].message.content
        assert deltas[-1].choices[0].finish_reason == r.choices[0].finish_reason
        # seeded sampling repeats; another seed differs
        def draw(seed):
            return client.completions.create(model=NAME, prompt=ids, max_tokens=16, temperature=1.0, top_p=0.9,
                                             seed=seed, extra_body={"return_token_ids": True, "ignore_eos": True}
                                             ).choices[0].model_extra["token_ids"]
        assert draw(7) == draw(7) != draw(8)
        wait_until(lambda: idle(srv.url), what="idle")


def test_concurrent_greedy_requests_get_their_served_alone_tokens(tiny):
    """32 concurrent requests, prompts of 3..40 tokens, 4..40 new tokens, through 16 KV rows (the rest queue
    and join as rows free up): each gets exactly generate() of its prompt alone."""
    _, model, codec = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (int(torch.randint(3, 41, (1,), generator=g)),), generator=g).tolist()
               for _ in range(32)]
    lens = [int(torch.randint(4, 41, (1,), generator=g)) for _ in range(32)]
    want = [generate(model, [p], n, eos_id=EOS)[0] for p, n in zip(prompts, lens)]
    gaps = []
    with torch.no_grad():  # the premise: no greedy step is a near tie
        for p, w in zip(prompts, want):
            seq = torch.tensor([p + w])
            top2 = model(seq, model.new_cache(1, seq.shape[1]), 0, all_logits=True)[0, len(p) - 1:-1].topk(2).values
            gaps.append((top2[:, 0] - top2[:, 1]).min().item())
    assert min(gaps) > 1e-4, min(gaps)
    assert len({tuple(w) for w in want}) == 32 and sum(w[-1] == EOS for w in want) >= 1  # varied, some end at EOS

    async def run(url):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        async def one(p, n, stream):
            if not stream:
                r = await client.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0,
                                                    extra_body={"return_token_ids": True})
                return r.choices[0].model_extra["token_ids"], r.choices[0].finish_reason
            ids, finish = [], None
            async for c in await client.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0,
                                                           stream=True, extra_body={"return_token_ids": True}):
                ids += c.choices[0].model_extra["token_ids"]
                finish = c.choices[0].finish_reason or finish
            return ids, finish

        try:
            return await asyncio.wait_for(asyncio.gather(*[one(p, n, i % 2 == 1) for i, (p, n) in
                                                           enumerate(zip(prompts, lens))]), 120)
        finally:
            await client.close()

    with serving(model, codec, max_batch=16, max_queue=64) as (srv, engine):
        got = asyncio.run(run(srv.url))
        assert engine.scheduler.peak_running == 16  # they really ran together
        for i, ((ids, finish), w) in enumerate(zip(got, want)):
            assert ids == w, i
            assert finish == ("stop" if w[-1] == EOS else "length")
        wait_until(lambda: idle(srv.url), what="idle")


def test_bad_requests_are_clean_4xx_and_the_server_keeps_serving(tiny):
    _, model, codec = tiny
    ok = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}
    cases = [
        ('{"model": "tiny", "prompt": ', 400, None),  # malformed JSON
        ("[1, 2]", 400, None),  # not an object
        ({"model": NAME}, 400, "prompt"),
        ({**ok, "model": "gpt-4"}, 404, "model"),
        ({**ok, "max_tokens": 0}, 400, "max_tokens"),
        ({**ok, "max_tokens": -3}, 400, "max_tokens"),
        ({**ok, "max_tokens": 10**12}, 400, "max_tokens"),
        ({**ok, "max_tokens": "many"}, 400, "max_tokens"),
        ({**ok, "prompt": list(range(3, 67)), "max_tokens": 1}, 400, "prompt"),  # 64 tokens: the whole context
        ({**ok, "prompt": list(range(3, 60)), "max_tokens": 8}, 400, "max_tokens"),  # 57 + 8 > 64
        ({**ok, "prompt": ""}, 400, "prompt"),
        ({**ok, "prompt": []}, 400, "prompt"),
        ({**ok, "prompt": ["a", "b"]}, 400, "prompt"),
        ({**ok, "prompt": [5, 10**6]}, 400, "prompt"),
        ({**ok, "prompt": [5, -1]}, 400, "prompt"),
        ({**ok, "temperature": 5}, 400, "temperature"),
        ({**ok, "top_p": 0}, 400, "top_p"),
        ({**ok, "n": 2}, 400, "n"),
        ({**ok, "logprobs": 2}, 400, "logprobs"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**ok, "stream": "yes please"}, 400, "stream"),
    ]
    chat_cases = [
        ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
        ({"model": NAME, "messages": "hello"}, 400, "messages"),
        ({"model": NAME, "messages": [{"role": "user", "content": "x" * 400}]}, 400, "messages"),  # over context
    ]
    with serving(model, codec, max_len=64) as (srv, _):
        for path, group in (("/v1/completions", cases), ("/v1/chat/completions", chat_cases)):
            for body, status, param in group:
                err = is_openai_error(post(srv.url, path, body), status)
                if param is not None:
                    assert err["param"] == param, (body, err)
                healthy(srv.url)
        assert is_openai_error(post(srv.url, "/v1/completions", {**ok, "model": "x"}), 404)["code"] == "model_not_found"
        is_openai_error(httpx.get(srv.url + "/v1/nothing"), 404)
        is_openai_error(httpx.get(srv.url + "/v1/completions"), 405)
        # the limits themselves are accepted: a 63-token prompt and 1 new token fill the 64-token context
        r = post(srv.url, "/v1/completions", {**ok, "prompt": list(range(3, 66)), "max_tokens": 1})
        assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 63, "completion_tokens": 1,
                                                              "total_tokens": 64}
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(BadRequestError):
            client.completions.create(model=NAME, prompt="hi", max_tokens=0)
        assert client.completions.create(model=NAME, prompt="hi", max_tokens=3).usage.completion_tokens >= 1
        assert idle(srv.url)


def test_engine_failure_is_a_500_in_openai_shape_and_serving_goes_on(tiny):
    _, model, codec = tiny
    with serving(SlowModel(model, pause=0, fail_on=299), codec) as (srv, engine):
        err = is_openai_error(post(srv.url, "/v1/completions", {"model": NAME, "prompt": [299, 5], "max_tokens": 3}),
                              500)
        assert err["type"] == "server_error"
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(APIError, match="generation failed"):
            list(client.completions.create(model=NAME, prompt=[299, 7], max_tokens=3, stream=True))
        healthy(srv.url)
        assert client.completions.create(model=NAME, prompt=[5, 299], max_tokens=3).choices[0].finish_reason
        wait_until(lambda: idle(srv.url), what="idle")


def test_a_client_that_goes_away_frees_its_slot(tiny):
    _, model, codec = tiny
    with serving(SlowModel(model, pause=0.1), codec, max_batch=2) as (srv, engine):
        body = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # kept: an iterator dropped early closes the response (a disconnect)
            assert next(line for line in lines if line.startswith("data:"))
            assert metric(srv.url, "esparse_kv_slots_used") == 1
            assert metric(srv.url, "esparse_request_finished_total", 'reason="cancelled"') == 0
        # the stream is closed after one chunk: the sequence is cancelled and its row freed
        wait_until(lambda: metric(srv.url, "esparse_request_finished_total", 'reason="cancelled"') == 1,
                   what="the cancellation")
        wait_until(lambda: idle(srv.url), what="idle")
        # a non-streaming request whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            post(srv.url, "/v1/completions", {**body, "stream": False}, timeout=0.5)
        wait_until(lambda: metric(srv.url, "esparse_request_finished_total", 'reason="cancelled"') == 2,
                   what="the second cancellation")
        wait_until(lambda: idle(srv.url), what="idle")
        assert metric(srv.url, "esparse_request_finished_total", 'reason="length"') == 0
        healthy(srv.url)


def test_a_full_queue_answers_429_with_retry_after(tiny):
    _, model, codec = tiny
    with serving(SlowModel(model, pause=0.1), codec, max_batch=1, max_queue=1) as (srv, _):
        long = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json={**long, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()  # kept: an iterator dropped early closes the response (a disconnect)
            assert next(line for line in lines if line.startswith("data:"))  # running in the only row
            queued: dict = {}
            t = threading.Thread(target=lambda: queued.update(r=post(srv.url, "/v1/completions",
                                                                     {**long, "max_tokens": 3})))
            t.start()
            wait_until(lambda: metric(srv.url, "esparse_waiting_requests") == 1, what="one waiting")
            r3 = post(srv.url, "/v1/completions", long)
            err = is_openai_error(r3, 429)
            assert err["code"] == "queue_full" and r3.headers["retry-after"] == "1"
            healthy(srv.url)
        t.join(30)  # the long stream was dropped: the queued request gets the row and completes
        assert queued["r"].status_code == 200 and queued["r"].json()["usage"]["completion_tokens"] == 3
        wait_until(lambda: idle(srv.url), what="idle")


def test_requests_past_the_timeout_get_408_and_leave(tiny):
    _, model, codec = tiny
    with serving(SlowModel(model), codec, request_timeout=0.5, max_batch=1) as (srv, _):
        long = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json={**long, "stream": True}, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
        assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "timeout"
        assert 1 <= len(lines) - 1 < 100
        # one running, one waiting in the queue: both time out, the waiting one without ever getting a row
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(a=post(srv.url, "/v1/completions", long)))
        t.start()
        wait_until(lambda: metric(srv.url, "esparse_running_requests") == 1, what="one running")
        assert is_openai_error(post(srv.url, "/v1/completions", long), 408)["type"] == "timeout_error"
        t.join(30)
        is_openai_error(out["a"], 408)
        wait_until(lambda: idle(srv.url), what="idle")
        healthy(srv.url)


def test_200_requests_leave_no_slot_in_use(tiny):
    _, model, codec = tiny

    async def run(url):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        sem = asyncio.Semaphore(24)

        async def one(i):
            async with sem:
                kw = dict(model=NAME, prompt=[3 + i % 250, 4, 5 + i % 7], max_tokens=1 + i % 8, temperature=0)
                if i % 2:
                    n = 0
                    async for c in await client.completions.create(**kw, stream=True,
                                                                   stream_options={"include_usage": True}):
                        n = c.usage.completion_tokens if c.usage else n
                    return n
                return (await client.completions.create(**kw)).usage.completion_tokens

        try:
            return await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(200)]), 180)
        finally:
            await client.close()

    with serving(model, codec, max_batch=8, max_queue=200) as (srv, engine):
        tokens = asyncio.run(run(srv.url))
        wait_until(lambda: idle(srv.url), what="idle")
        assert metric(srv.url, "esparse_requests_total", 'code="200",endpoint="/v1/completions"') == 200
        assert metric(srv.url, "esparse_generation_tokens_total") == sum(tokens)
        assert engine.scheduler.slots.in_use == 0 and engine.scheduler.peak_running == 8


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny):
    """``esparse serve`` in a process: SIGTERM while one request streams and three wait for the only row; all
    four complete in full, then the process exits with code 0."""
    ft, _, _ = tiny
    cmd = [sys.executable, "-m", "esparse.cli", "serve", str(ft), "--device", "cpu", "--port", "0",
           "--max-batch", "1", "--max-len", "128"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log: list[str] = []
    found = threading.Event()

    def read():
        for line in proc.stderr:
            log.append(line)
            if " on http://" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(120), "".join(log)
        port = int(re.search(r"on http://127\.0\.0\.1:(\d+) ", "".join(log)).group(1))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ok(url), what="the server")

        async def run():
            first = asyncio.Event()

            async def one(client):
                body = {"model": ft.name, "prompt": [5, 6, 7], "max_tokens": 60, "ignore_eos": True, "stream": True,
                        "return_token_ids": True}
                n, done = 0, False
                async with client.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data:"):
                            n += len(json.loads(line.removeprefix("data: "))["choices"][0]["token_ids"])
                            first.set()
                return n, done

            async with httpx.AsyncClient() as client:
                tasks = [asyncio.create_task(one(client)) for _ in range(4)]
                await asyncio.wait_for(first.wait(), 60)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(asyncio.gather(*tasks), 120)

        results = asyncio.run(run())
        assert results == [(60, True)] * 4
        assert proc.wait(60) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_cli_refuses_bad_arguments(tiny, capsys):
    ft, _, _ = tiny
    assert main(["serve", str(ft), "--device", "cpu", "--max-len", "4096", "--port", "0"]) == 2
    assert "exceeds the model's 128 positions" in capsys.readouterr().err
    assert main(["serve", "--device", "cpu"]) == 2
    from esparse import limits

    with pytest.MonkeyPatch.context() as mp:  # a cache the machine cannot hold: refused before it is allocated
        mp.setattr(limits, "free_memory", lambda device: 1 << 20)
        assert main(["serve", str(ft), "--device", "cpu", "--max-batch", "64", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "the KV cache of --max-batch 64 x --max-len" in err and "lower --max-batch or --max-len" in err, err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(ft), "--device", "cpu", "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(ft), "--max-batch", "0"])
