"""`flaxlm serve` through the official `openai` client, on 127.0.0.1 with a tiny model.

The server runs in this process (uvicorn in a thread, started and stopped by the
module fixture); each answer is compared with the same request run alone through
a second `LLM` of the same directory.
"""

import asyncio
import re
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from flaxlm.infer.defaults import LLAMA_CPP_DEFAULTS, sampling_defaults
from flaxlm.infer.llm import LLM
from flaxlm.infer.sampling import SamplingParams
from flaxlm.infer.serve.app import create_app
from flaxlm.infer.serve.scheduler import Request, Scheduler
from tests.serve.conftest import free_port

KEY = "sekret"
SLOTS = 4


class Served:
    def __init__(self, url, app, scheduler, reference, compiled):
        self.url, self.app, self.scheduler = url, app, scheduler
        self.reference, self.compiled = reference, compiled

    def client(self, **kwargs):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {m[0]: float(m[1]) for m in re.findall(r"^(\S+) (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def served(tiny_chat):
    llm = LLM.load(tiny_chat)
    scheduler = Scheduler(llm, max_slots=SLOTS, max_queue=40, context=256, steps_per_round=4,
                          chunks=(64, 256))
    scheduler.warmup()
    compiled = scheduler.num_compiled
    scheduler.start()
    defaults, _ = sampling_defaults(tiny_chat)
    app = create_app(llm, scheduler, model_name="tiny", defaults=defaults, api_key=KEY,
                     request_timeout_s=60)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield Served(f"http://127.0.0.1:{port}", app, scheduler, LLM.load(tiny_chat), compiled)
    server.should_exit = True
    thread.join(timeout=60)


def test_models_auth_and_unknown_model(served):
    client = served.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{served.url}/v1/models").status_code == 401
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_chat_and_completions_equal_llm(served):
    client, llm = served.client(), served.reference
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "The quick brown fox"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                          temperature=0, extra_body={"ignore_eos": True})
    ref = llm.chat(messages, SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))
    assert chat.choices[0].message.content == ref.text
    assert chat.choices[0].finish_reason == "length" and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert chat.usage.completion_tokens == 20

    # n=2 seeded samples with every extra setting; logprobs with top 3 alternatives
    extra = {"top_k": 30, "min_p": 0.02, "repetition_penalty": 1.1, "min_tokens": 3}
    out = client.completions.create(model="tiny", prompt="Hello, world", max_tokens=12, n=2,
                                    seed=11, temperature=0.9, top_p=0.95, presence_penalty=0.2,
                                    frequency_penalty=0.1, logit_bias={"9": 3.0}, logprobs=3,
                                    extra_body=extra)
    params = SamplingParams(max_new_tokens=12, n=2, seed=11, temperature=0.9, top_p=0.95,
                            presence_penalty=0.2, frequency_penalty=0.1, logit_bias={9: 3.0},
                            logprobs=3, top_k=30, min_p=0.02, repetition_penalty=1.1,
                            min_new_tokens=3)
    ref = llm.generate("Hello, world", params)[0]
    assert sorted(c.text for c in out.choices) == sorted(o.text for o in ref.outputs)
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        match = next(o for o in ref.outputs if o.text == choice.text)
        np.testing.assert_allclose(choice.logprobs.token_logprobs, match.logprobs, atol=1e-4)
        assert choice.logprobs.tokens == [llm.tokenizer.decode([t]) for t in match.token_ids]
        decode = llm.tokenizer.decode
        assert choice.logprobs.top_logprobs == [  # keyed by text (ids may share one)
            pytest.approx({decode([t]): lp for t, lp in top.items()}, abs=1e-4)
            for top in match.top_logprobs]
        assert choice.finish_reason == match.finish_reason

    # a stop string: cut before it, finish_reason stop
    free = llm.generate("The quick", SamplingParams(temperature=0, max_new_tokens=16,
                                                    ignore_eos=True))[0]
    stop = free.text[4:7]
    out = client.completions.create(model="tiny", prompt="The quick", max_tokens=16,
                                    temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    ref = llm.generate("The quick", SamplingParams(temperature=0, max_new_tokens=16,
                                                   ignore_eos=True, stop=[stop]))[0]
    assert out.choices[0].text == ref.text and stop not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"

    # n=2 streamed chat choices, each the LLM's
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, n=2,
                                            seed=3, temperature=1.0, stream=True,
                                            extra_body={"ignore_eos": True, "top_k": 0,
                                                        "min_p": 0.0, "top_p": 1.0})
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    ref = llm.chat(messages, SamplingParams(max_new_tokens=8, n=2, seed=3, temperature=1.0,
                                            ignore_eos=True))
    assert sorted(texts.values()) == sorted(o.text for o in ref.outputs)

    # chat logprobs
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_defaults_are_llama_cpp_without_generation_settings(served, tiny_chat):
    """The tiny directory's generation_config.json holds only token ids: a request that sets
    no sampling field samples with llama.cpp's chat defaults."""
    assert sampling_defaults(tiny_chat)[0] == LLAMA_CPP_DEFAULTS
    out = served.client().completions.create(model="tiny", prompt="Hello", max_tokens=10,
                                             seed=4, extra_body={"ignore_eos": True})
    ref = served.reference.generate("Hello", SamplingParams(max_new_tokens=10, seed=4,
                                                            ignore_eos=True, **LLAMA_CPP_DEFAULTS))
    assert out.choices[0].text == ref[0].text


def _stream_requests(llm):
    """32 mixed requests: greedy and seeded sampling, lengths 3-16, stop strings, chat and
    completions, logprobs on the completions."""
    rng = np.random.default_rng(1)
    words = "The quick brown fox jumps over the lazy dog Hello world def main return 42".split()
    requests = []
    for i in range(32):
        prompt = " ".join(rng.choice(words, int(rng.integers(1, 12))))
        greedy = i % 2 == 0
        body = dict(max_tokens=int(rng.integers(3, 17)), temperature=0 if greedy else 0.8,
                    top_p=1.0 if greedy else 0.9, seed=None if greedy else i,
                    extra_body={"top_k": 0 if greedy else 25, "min_p": 0.0, "ignore_eos": i % 3 > 0})
        if i % 5 == 1:
            body["stop"] = [" the", "o"]
        requests.append((i % 4 == 3, prompt, body))
    return requests


def _expected(llm, chat, prompt, body):
    params = SamplingParams(max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                            top_p=body["top_p"], seed=body["seed"], stop=tuple(body.get("stop", ())),
                            top_k=body["extra_body"]["top_k"], min_p=0.0,
                            ignore_eos=body["extra_body"]["ignore_eos"])
    if chat:
        return llm.chat([{"role": "user", "content": prompt}], params)
    return llm.generate(prompt, params)[0]


async def _stream_one(client, chat, prompt, body):
    """(text, finish reason, token strings or None, usage) read from SSE chunks."""
    options = {"include_usage": True}
    if chat:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], stream=True,
            stream_options=options, **body)
    else:
        stream = await client.completions.create(model="tiny", prompt=prompt, stream=True,
                                                 stream_options=options, logprobs=0, **body)
    text, reasons, tokens, usage = [], [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            assert choice.index == 0 and not reasons, "a chunk after the finish reason"
            text.append(choice.delta.content or "" if chat else choice.text)
            if not chat and choice.logprobs is not None:
                tokens += choice.logprobs.tokens
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    return "".join(text), reasons, tokens, usage


def test_32_concurrent_streams_each_equal_alone(served):
    """No chunk lost, duplicated or out of order: each stream's text, token strings, finish
    reason and usage equal the request alone through LLM."""
    requests = _stream_requests(served.reference)

    async def all_streams():
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(*[_stream_one(client, *r) for r in requests])

    results = asyncio.run(all_streams())
    for (chat, prompt, body), (text, reasons, tokens, usage) in zip(requests, results):
        ref = _expected(served.reference, chat, prompt, body)
        assert text == ref.text, (chat, prompt, body)
        assert reasons == [ref.finish_reason]
        assert usage.completion_tokens == len(ref.token_ids)
        if not chat:
            assert tokens == [served.reference.tokenizer.decode([t]) for t in ref.token_ids]


def _bad(call):
    with pytest.raises(openai.BadRequestError) as e:
        call()
    return e.value.body


def test_bad_requests_name_the_field(served):
    client = served.client()
    body = _bad(lambda: client.completions.create(model="tiny", prompt="x", temperature=5))
    assert body["param"] == "temperature" and body["type"] == "invalid_request_error"
    body = _bad(lambda: client.chat.completions.create(model="tiny", messages=[]))
    assert body["param"] == "messages"
    body = _bad(lambda: client.completions.create(model="tiny", prompt="x", max_tokens=-1))
    assert body["param"] == "max_tokens"
    body = _bad(lambda: client.completions.create(model="tiny", prompt="x", n=9))
    assert body["param"] == "n"
    body = _bad(lambda: client.completions.create(model="tiny", prompt="hello " * 200,
                                                  max_tokens=100))
    assert body["code"] == "context_length_exceeded"
    body = _bad(lambda: client.completions.create(model="tiny", prompt="x",
                                                  logit_bias={"100000": 1}))
    assert body["param"] == "logit_bias"
    r = httpx.post(f"{served.url}/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}",
                            "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def _pace(scheduler, seconds):
    """A request whose listener sleeps on the scheduler thread: every round takes `seconds`
    while it runs (its slot stays busy until cancelled)."""
    request = Request(prompt_ids=[1, 2, 3],
                      params=SamplingParams(temperature=0, max_new_tokens=250, ignore_eos=True),
                      emit=lambda event: time.sleep(seconds))
    scheduler.submit(request)
    return request


def _wait_for(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_disconnect_frees_its_slot(served):
    pacer = _pace(served.scheduler, 0.1)
    before = served.metrics()
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 200, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert _wait_for(lambda: served.metrics()["flaxlm_busy_slots"] == 2)
    assert _wait_for(lambda: served.metrics()["flaxlm_busy_slots"] == 1)
    after = served.metrics()
    cancelled = 'flaxlm_requests_total{endpoint="/v1/completions",status="499"}'
    assert after.get(cancelled, 0) == before.get(cancelled, 0) + 1
    generated = after["flaxlm_generation_tokens_total"] - before["flaxlm_generation_tokens_total"]
    assert generated < 100  # stopped early, far from its 200 tokens
    pacer.cancel()
    assert _wait_for(lambda: served.metrics()["flaxlm_busy_slots"] == 0)


def test_full_queue_answers_429(served):
    """The scheduler is held (a listener sleeping) while the queue fills to --max-queue."""
    gate = threading.Event()
    holder = Request(prompt_ids=[1, 2], params=SamplingParams(temperature=0, max_new_tokens=2),
                     emit=lambda event: gate.wait(30))
    served.scheduler.submit(holder)
    assert _wait_for(lambda: served.scheduler.queue_depth == 0)  # holder's listener waits
    waiting = [Request(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=2),
                       emit=lambda event: None) for _ in range(40)]
    for request in waiting:
        served.scheduler.submit(request)
    with pytest.raises(openai.RateLimitError):
        served.client().completions.create(model="tiny", prompt="x", max_tokens=2)
    for request in waiting + [holder]:
        request.cancel()
    gate.set()
    assert _wait_for(lambda: served.scheduler.queue_depth == 0 and
                     served.metrics()["flaxlm_busy_slots"] == 0)
    assert served.client().completions.create(model="tiny", prompt="x", max_tokens=2).choices


def test_a_request_past_its_timeout_answers_408(served):
    server = served.app.state.server
    server.timeout_s = 0.0
    try:
        with pytest.raises(openai.APIStatusError) as e:
            served.client().completions.create(model="tiny", prompt="x", max_tokens=5)
    finally:
        server.timeout_s = 60
    assert e.value.status_code == 408 and e.value.body["code"] == "timeout"
    assert served.client().completions.create(model="tiny", prompt="x", max_tokens=2).choices


def test_metrics_after_the_run(served):
    """Every request above, whatever its settings, ran on the programs of warm-up; the
    counters and histograms saw them."""
    m = served.metrics()
    assert m["flaxlm_programs_compiled"] == served.compiled
    assert m['flaxlm_requests_total{endpoint="/v1/completions",status="200"}'] >= 20
    assert m['flaxlm_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 8
    assert m['flaxlm_requests_total{endpoint="/v1/completions",status="400"}'] >= 4
    assert m["flaxlm_time_to_first_token_seconds_count"] >= 30
    assert m["flaxlm_time_per_output_token_seconds_count"] >= 30
    assert m["flaxlm_generation_tokens_total"] >= m["flaxlm_time_to_first_token_seconds_count"]
    assert m["flaxlm_prompt_tokens_total"] > 0 and m["flaxlm_max_slots"] == SLOTS
    assert m["flaxlm_queue_depth"] == 0 and m["flaxlm_busy_slots"] == 0


def test_embeddings(served):
    client, llm = served.client(), served.reference
    texts = ["The quick brown fox", "Hello, world"]
    out = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in out.data])
    np.testing.assert_allclose(got, llm.embed(texts), atol=1e-5)
    assert out.usage.prompt_tokens == sum(len(llm.tokenizer.encode(t)) for t in texts)
    floats = client.embeddings.create(model="tiny", input="Hello", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, llm.embed(["Hello"])[0], atol=1e-5)
