"""A conversation keeps its KV cache from turn to turn: every reply is HF's greedy
continuation of the whole conversation, later turns feed only their new tokens, and
after the first turn nothing compiles, however long the prompt grows."""

import json

import pytest
import torch
import transformers

from flaxlm.infer import LLM, SamplingParams
from flaxlm.model import ConfigError
from tests.hf_models import TINY, save_tokenizer
from tests.infer.greedy_reference import TINY_TOL, compare_greedy

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NEW = 12
GREEDY = SamplingParams(temperature=0, max_new_tokens=NEW)
WORDS = ("The quick brown fox jumps over the lazy dog def main return 42 Hello world "
         "12345 again and then more of it").split()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """(HF model, LLM) of a tiny llama with a 2,048-token context and a ChatML template."""
    directory = tmp_path_factory.mktemp("chat-llama")
    config = transformers.LlamaConfig(**{**TINY, "max_position_embeddings": 2048},
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.eval().float()
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, config.vocab_size)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = CHATML
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return model, LLM.load(directory)


def _message(llm, messages, target: int) -> str:
    """A user message that makes the conversation's prompt about `target` tokens long."""
    words: list[str] = []
    while True:
        text = " ".join(words) or "hi"
        ids = llm.chat_prompt_ids([*messages, {"role": "user", "content": text}])
        if len(ids) >= target:
            return text
        words += [WORDS[(len(words) + i) % len(WORDS)] for i in range(max(1, (target - len(ids)) // 3))]


def test_ten_turns_growing_to_1500_tokens_compile_nothing_after_the_first(chat_model):
    hf_model, llm = chat_model
    conversation = llm.conversation(GREEDY)
    compiled, lengths = None, []
    for turn, target in enumerate(range(20, 1501, 160)):
        message = _message(llm, conversation.messages, target)
        prompt = llm.chat_prompt_ids([*conversation.messages, {"role": "user", "content": message}])
        held = len(conversation._held)
        stream = conversation.send(message)
        text = "".join(stream)
        lengths.append(len(prompt))
        compare_greedy(hf_model, prompt, stream.token_ids, tol=TINY_TOL, max_new=NEW, eos=0,
                       label=f"turn {turn}")
        assert conversation.messages[-1] == {"role": "assistant", "content": text}
        if turn == 0:
            compiled = llm.num_compiled
            assert conversation.fed_tokens == len(prompt)
        else:
            # Only what follows the shared start was fed (the last reply, re-encoded, and
            # the new message), at least one token.
            assert 1 <= conversation.fed_tokens <= len(prompt) - held // 2
    assert llm.num_compiled == compiled, "a later turn compiled a program"
    assert lengths[0] < 64 and lengths[-1] >= 1400 and lengths == sorted(lengths)


def test_a_turn_that_outgrows_the_cache_starts_a_bigger_one(chat_model):
    hf_model, llm = chat_model
    conversation = llm.conversation(GREEDY, capacity=256)
    for target in (40, 300):
        message = _message(llm, conversation.messages, target)
        prompt = llm.chat_prompt_ids([*conversation.messages, {"role": "user", "content": message}])
        stream = conversation.send(message)
        list(stream)
        compare_greedy(hf_model, prompt, stream.token_ids, tol=TINY_TOL, max_new=NEW, eos=0,
                       label=f"{target} tokens")
    assert conversation.capacity == 512 and conversation.fed_tokens == len(prompt)


def test_bad_conversations_are_named(chat_model):
    _, llm = chat_model
    with pytest.raises(ConfigError, match="one sampled reply"):
        llm.conversation(SamplingParams(n=2))
    with pytest.raises(ConfigError, match="capacity"):
        llm.conversation(capacity=0)
    with pytest.raises(ConfigError, match="message is empty"):
        llm.conversation().send("  ")
