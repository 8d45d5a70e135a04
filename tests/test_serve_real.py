"""``esparse serve`` on the real SmolLM2-135M-Instruct export (CPU, fp32 compute on the fp16 export): the openai
client's completions, chat (the exported chat template, EOS ``<|im_end|>``) and streaming; concurrent greedy
requests get their served-alone tokens. Prompts were chosen, and the test checks, so that no greedy step is a
near tie (smallest top-2 logit gap ~0.02, against ~1e-5 of fp32 rounding between batch sizes)."""

import asyncio

import httpx
import pytest
import torch
from openai import AsyncOpenAI, BadRequestError, OpenAI

from esparse.assets import smollm2_hf_dir
from esparse.converter.ft_export import export_folder
from esparse.python_api import load_decoder
from esparse.python_api.generate import generate
from esparse.python_api.serve.engine import Engine, EngineConfig
from esparse.python_api.serve.metrics import ServeMetrics
from esparse.python_api.serve.server import ServerThread, create_app
from esparse.python_api.serve.text import TextCodec

pytestmark = pytest.mark.real
PROMPTS = {"The capital of France is": 10, "In mathematics, a prime number is": 6, "Sparse matrices": 8,
           "The river flows through the valley and": 12}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "ft"
    export_folder(smollm2_hf_dir(), out, tp=1, dtype="fp16")
    model = load_decoder(out, device="cpu", dtype=torch.float32)
    return model, TextCodec.from_folder(out, model.cfg.end_id)


def test_real_tokenizer_streams_its_text(smol):
    _, codec = smol
    ids = codec.encode("naïve café — 東京タワー, Paris.\n\tdone")
    d = codec.detokenizer(codec.encode("Say:"))
    assert "".join(d.add(t) for t in ids) + d.flush() == codec.tokenizer.decode(ids, skip_special_tokens=True)


def test_real_smollm2_served_to_the_openai_client(smol):
    model, codec = smol
    assert codec.eos_ids == {2} and codec.has_chat_template
    prompts = {p: codec.encode(p) for p in PROMPTS}
    want = {p: generate(model, [ids], PROMPTS[p], eos_id=2)[0] for p, ids in prompts.items()}
    with torch.no_grad():  # the premise: no greedy step is a near tie
        for p, ids in prompts.items():
            seq = torch.tensor([ids + want[p]])
            top2 = model(seq, model.new_cache(1, seq.shape[1]), 0, all_logits=True)[0, len(ids) - 1:-1].topk(2).values
            assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-3, p
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_want = generate(model, [codec.chat_prompt(messages)], 16, eos_id=2)[0]

    metrics = ServeMetrics(4)
    engine = Engine(model, EngineConfig(max_batch=4, max_len=256), codec.eos_ids, metrics)
    with ServerThread(create_app(engine, codec, "smollm2", metrics, request_timeout=300)) as srv:
        async def together():
            client = AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
            try:
                rs = await asyncio.wait_for(asyncio.gather(*[
                    client.completions.create(model="smollm2", prompt=p, max_tokens=n, temperature=0,
                                              extra_body={"return_token_ids": True}) for p, n in PROMPTS.items()]),
                    300)
            finally:
                await client.close()
            return {p: r.choices[0] for p, r in zip(PROMPTS, rs)}

        got = asyncio.run(together())
        assert engine.scheduler.peak_running == 4
        for p, choice in got.items():
            assert choice.model_extra["token_ids"] == want[p], p
            assert choice.text == codec.tokenizer.decode(want[p], skip_special_tokens=True)
        assert got["The capital of France is"].text.startswith(" Paris")

        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
        answer = r.choices[0].message.content
        assert answer == codec.tokenizer.decode(chat_want, skip_special_tokens=True) and "Paris" in answer
        assert r.choices[0].finish_reason == ("stop" if chat_want[-1] == 2 else "length")
        chunks = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        parts = list(chunks)
        assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == answer
        assert parts[-1].usage.completion_tokens == len(chat_want)
        with pytest.raises(BadRequestError, match="context"):
            client.completions.create(model="smollm2", prompt="word " * 300, max_tokens=4)
        text = httpx.get(srv.url + "/metrics").text
        assert "esparse_kv_slots_used 0.0" in text and "esparse_waiting_requests 0.0" in text
