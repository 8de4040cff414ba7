"""Continuous batching without HTTP: each request, among others, equals LLM.generate alone."""

import threading
import time

import numpy as np
import pytest

from flaxlm.infer.llm import LLM
from flaxlm.infer.sampling import SamplingParams
from flaxlm.infer.serve.scheduler import Event, QueueFull, Request, Scheduler
from flaxlm.model import ConfigError

SLOTS = 4
CONTEXT = 256


class Collector:
    """A request's events, gathered on the scheduler thread."""

    def __init__(self, n=1):
        self.events: list[Event] = []
        self.n, self.done = n, threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.error is not None or sum(e.finish_reason is not None
                                          for e in self.events) == self.n:
            self.done.set()

    def tokens(self, k=0):
        return [t for e in self.events if e.index == k for t in e.token_ids]

    def text(self, k=0):
        return "".join(e.text for e in self.events if e.index == k)

    def reason(self, k=0):
        return [e.finish_reason for e in self.events if e.index == k and e.finish_reason]


def submit(scheduler, ids, params, **kwargs):
    collector = Collector(params.n)
    request = Request(prompt_ids=list(ids), params=params, emit=collector, **kwargs)
    scheduler.submit(request)
    return request, collector


def _serve(directory, **kwargs):
    """A scheduler warmed up and running on its own LLM of `directory`, with prefill chunks of
    16 and 32, one per round: a 100-token prompt takes four rounds, with decode steps of the
    others between them."""
    settings = dict(max_slots=SLOTS, context=CONTEXT, steps_per_round=4, chunks=(16, 32),
                    prefill_tokens=32)
    scheduler = Scheduler(LLM.load(directory), **{**settings, **kwargs})
    scheduler.warmup()
    scheduler.start()
    return scheduler


@pytest.fixture(scope="module")
def served(tiny_hf):
    """(scheduler, reference LLM) of a tiny llama."""
    _, directory = tiny_hf("llama-gqa", 5)
    scheduler = _serve(directory)
    yield scheduler, LLM.load(directory)
    scheduler.stop(drain_s=0)


def _mixed(llm, vocab):
    """Prompts and settings: greedy and seeded sampling with every filter and penalty, n=2,
    logprobs, stop strings, stop tokens, min_tokens; prompts from 3 to 100 tokens (two
    prompt buckets and one new-token bucket, so the references compile little)."""
    rng = np.random.default_rng(0)
    free = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_new_tokens=16,
                                                                ignore_eos=True))[0]
    settings = [
        SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=20, max_new_tokens=15, seed=3, ignore_eos=True,
                       repetition_penalty=1.2),
        SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05, max_new_tokens=16, seed=5,
                       presence_penalty=0.5, frequency_penalty=0.3, logit_bias={7: 5.0}),
        SamplingParams(temperature=0, max_new_tokens=16, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=1.0, max_new_tokens=12, seed=9, n=2, ignore_eos=True),
        SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, stop=[free.text[6:9]]),
        SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=(free.token_ids[5],),
                       min_new_tokens=2),
    ]
    out = []
    for i in range(14):
        length = 100 if i % 5 == 2 else int(rng.integers(3, 16))
        ids = rng.integers(1, vocab, length).tolist()
        if i % 7 == 5:
            ids = llm.tokenizer.encode("The quick brown fox")
        out.append((ids, settings[i % len(settings)]))
    return out


def _check_mixed(scheduler, llm, requests):
    """Submit `requests` 20 ms apart; each equals LLM.generate of it alone."""
    compiled = scheduler.num_compiled
    submitted = []
    for ids, params in requests:
        submitted.append((ids, params, submit(scheduler, ids, params)[1]))
        time.sleep(0.02)
    for ids, params, got in submitted:
        assert got.done.wait(120)
        reference = llm.generate([ids], params)[0].outputs
        for k in range(params.n):
            ref = next(r for r in reference if r.token_ids == got.tokens(k)) if params.n > 1 \
                else reference[0]
            assert got.tokens(k) == ref.token_ids, (len(ids), params)
            assert got.text(k) == ref.text
            assert got.reason(k) == [ref.finish_reason]
            if params.logprobs is not None:
                lp = [x for e in got.events for x in e.logprobs]
                np.testing.assert_allclose(lp, ref.logprobs, atol=1e-4)
                top = [x for e in got.events for x in e.top_logprobs]
                assert [list(t) for t in top] == [list(t) for t in ref.top_logprobs]
        if params.n > 1:
            assert sorted(got.tokens(k) for k in range(2)) == sorted(r.token_ids for r in reference)
    assert scheduler.num_compiled == compiled
    deadline = time.monotonic() + 30
    while scheduler.busy_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.busy_slots == 0 and scheduler.queue_depth == 0
    return {r for _, _, got in submitted for r in got.reason()}


def _fill(scheduler, tokens):
    """Run one request of `tokens` steps alone: the ring's write slot moves that far on."""
    got = submit(scheduler, [1, 2, 3], SamplingParams(temperature=0, max_new_tokens=tokens,
                                                      ignore_eos=True))[1]
    assert got.done.wait(60) and len(got.tokens()) == tokens


def test_each_request_among_others_equals_it_alone(served):
    """14 requests on 4 slots, arriving while others decode (queueing, chunked prefill, slots
    reused, the ring cache wrapping round during them): tokens, text, finish reason and
    logprobs are those of LLM.generate of the request alone, and nothing compiles after
    warm-up."""
    scheduler, llm = served
    _fill(scheduler, 200)
    reasons = _check_mixed(scheduler, llm, _mixed(llm, llm.config.vocab_size))
    assert reasons == {"stop", "length"}


def test_sliding_window_model_among_others(tiny_hf):
    """Sliding-window layers read the ring cache by position as well."""
    _, directory = tiny_hf("mistral-window", 5)
    scheduler = _serve(directory)
    llm = LLM.load(directory)
    try:
        _fill(scheduler, 200)
        _check_mixed(scheduler, llm, _mixed(llm, llm.config.vocab_size)[:8])
    finally:
        scheduler.stop(drain_s=0)


def test_cancel_and_timeout_free_their_slots(served):
    """The scheduler is held inside a listener (it runs on the scheduler thread) while a
    request's timeout passes; cancelled requests, running or waiting, end as such."""
    scheduler, llm = served
    long = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
    gate, first = threading.Event(), Collector()

    def blocking(event):
        gate.wait(30)
        first(event)

    held = [(Request(prompt_ids=[5, 6, 7], params=long, emit=blocking), first)]
    scheduler.submit(held[0][0])
    held += [submit(scheduler, [5, 6, 7], long) for _ in range(SLOTS)]  # one waits
    timed = submit(scheduler, [3, 4], long, timeout_s=0.3)
    time.sleep(0.6)
    for request, _ in held:
        request.cancel()
    gate.set()
    for _, collector in held:
        assert collector.done.wait(30)
        assert collector.reason()[-1] == "cancelled"
    assert timed[1].done.wait(30) and timed[1].reason() == ["timeout"]
    late = submit(scheduler, [3, 4], long, timeout_s=0.0)[1]
    assert late.done.wait(30) and late.reason() == ["timeout"] and not late.tokens()
    deadline = time.monotonic() + 30
    while scheduler.busy_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.busy_slots == 0
    ids = [11, 12, 13]
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    after = submit(scheduler, ids, params)[1]  # the freed slots serve a new request exactly
    assert after.done.wait(30)
    assert after.tokens() == llm.generate([ids], params)[0].token_ids


def test_a_failing_listener_fails_alone(served):
    scheduler, llm = served
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)

    def broken(event):
        raise RuntimeError("listener bug")

    scheduler.submit(Request(prompt_ids=[1, 2, 3], params=params, emit=broken))
    fine = submit(scheduler, [4, 5, 6], params)[1]
    assert fine.done.wait(30)
    assert fine.tokens() == llm.generate([[4, 5, 6]], params)[0].token_ids
    deadline = time.monotonic() + 30
    while scheduler.busy_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.busy_slots == 0


def test_bad_requests_are_refused_with_their_reason(served):
    scheduler, _ = served
    with pytest.raises(ConfigError, match="context of 256"):
        scheduler.check(list(range(1, 200)), SamplingParams(max_new_tokens=100))
    with pytest.raises(ConfigError, match="n=5"):
        scheduler.check([1], SamplingParams(n=5))
    with pytest.raises(ConfigError, match="logit_bias has token id 999"):
        scheduler.submit(Request(prompt_ids=[1], params=SamplingParams(logit_bias={999: 1.0}),
                                 emit=Collector()))
    with pytest.raises(ConfigError, match="multiple of 32"):
        Scheduler(scheduler.llm, context=100, chunks=(16, 32))


def test_a_full_queue_refuses(tiny_hf):
    _, directory = tiny_hf("llama-gqa", 5)
    scheduler = Scheduler(LLM.load(directory), max_slots=1, max_queue=2, context=CONTEXT)
    params = SamplingParams(temperature=0, max_new_tokens=4)
    for _ in range(2):  # not started: nothing leaves the queue
        scheduler.submit(Request(prompt_ids=[1, 2], params=params, emit=Collector()))
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        scheduler.submit(Request(prompt_ids=[1, 2], params=params, emit=Collector()))


def test_sharded_slots_equal_unsharded_llm(tiny_hf):
    """`flaxlm serve --mesh`: the slot programs partitioned over data x fsdp x tensor (the 8
    CPU devices) give each request the tokens of the unsharded LLM alone."""
    _, directory = tiny_hf("llama-gqa", 5)
    scheduler = Scheduler(LLM.load(directory, mesh="data=2,fsdp=2,tensor=2"), max_slots=2,
                          context=CONTEXT, steps_per_round=4, chunks=(8, 32))
    scheduler.warmup()
    scheduler.start()
    reference = LLM.load(directory)
    rng = np.random.default_rng(3)
    try:
        runs = []
        for i in range(4):
            ids = rng.integers(1, 320, int(rng.integers(3, 16))).tolist()
            params = SamplingParams(temperature=0.8 if i % 2 else 0, seed=i, max_new_tokens=16,
                                    ignore_eos=True)
            runs.append((ids, params, submit(scheduler, ids, params)[1]))
        for ids, params, got in runs:
            assert got.done.wait(120)
            assert got.tokens() == reference.generate([ids], params)[0].token_ids
    finally:
        scheduler.stop(drain_s=0)


def test_a_long_prompt_does_not_stall_the_streams(served):
    """A 200-token prompt goes in 32 tokens per round (the fixture's budget), with a decode
    step of the running request between its chunks; then it decodes like any other."""
    scheduler, llm = served
    order = []

    class Logged(Collector):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, event):
            order.extend([self.name] * len(event.token_ids))
            super().__call__(event)

    running, long = Logged("running"), Logged("long")
    params = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
    scheduler.submit(Request(prompt_ids=[5, 6, 7], params=params, emit=running))
    while not running.events:
        time.sleep(0.001)
    ids = np.random.default_rng(4).integers(1, 320, 200).tolist()
    short = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    mark = len(order)
    scheduler.submit(Request(prompt_ids=ids, params=short, emit=long))
    assert long.done.wait(60) and running.done.wait(60)
    first = order.index("long")
    # chunks of 32 x 6 + 16: a decode step of the running request after each of the first 6
    assert order[mark:first].count("running") >= 6
    assert long.tokens() == llm.generate([ids], short)[0].token_ids
    assert running.tokens() == llm.generate([[5, 6, 7]], params)[0].token_ids


def test_lora_adapter_served_and_soft_prompt_refused(tiny_hf, tmp_path):
    """`flaxlm serve --adapter`: a LoRA adapter (unmerged) serves exactly what LLM.generate
    gives with the same adapter; a soft prompt is refused before anything compiles."""
    import jax
    from flax import nnx

    from flaxlm.model import load
    from flaxlm.model.lora import LoraConfig, adapters, apply_lora
    from flaxlm.model.peft_io import save_adapter
    from flaxlm.model.prompt_tuning import PromptTuning, apply_prompt_tuning

    _, directory = tiny_hf("llama-gqa", 5)
    model, _ = load(directory)
    apply_lora(model, LoraConfig(rank=4, alpha=8), nnx.Rngs(0))
    for i, lora in enumerate(adapters(model).values()):
        lora.b[...] = 0.5 * jax.random.normal(jax.random.key(i), lora.b.shape)
    save_adapter(model, tmp_path / "lora", base_model_name_or_path=str(directory))
    llm = LLM.load(directory, adapter=tmp_path / "lora")
    scheduler = Scheduler(llm, max_slots=2, context=CONTEXT, chunks=(16, 32))
    scheduler.start()
    try:
        greedy = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
        prompt = llm.tokenizer.encode("The quick brown fox")
        _, collector = submit(scheduler, prompt, greedy)
        assert collector.done.wait(120)
        expected = llm.generate(prompt, greedy)[0].token_ids
        assert collector.tokens() == expected
        assert expected != LLM.load(directory).generate(prompt, greedy)[0].token_ids
    finally:
        scheduler.stop(drain_s=0)
    plain, tokenizer = load(directory)
    apply_prompt_tuning(plain, PromptTuning(num_virtual_tokens=4), nnx.Rngs(0), tokenizer)
    save_adapter(plain, tmp_path / "prompt", base_model_name_or_path=str(directory))
    with pytest.raises(ConfigError, match="prompt-tuning adapter"):
        Scheduler(LLM.load(directory, adapter=tmp_path / "prompt"), context=CONTEXT)
