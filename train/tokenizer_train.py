"""Train a byte-level BPE tokenizer (HF `tokenizers`) with BOS/EOS/PAD and ChatML tokens.

The result is a `flaxlm.model.Tokenizer`; `.save(dir)` writes tokenizer.json and
tokenizer_config.json that `Tokenizer.from_hf_dir` and transformers'
`AutoTokenizer` load. Token ids 0-4 are the special tokens below; then the 256
byte symbols; then the learned merges.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from flaxlm.model.errors import ConfigError
from flaxlm.model.tokenizer import Tokenizer

EOS, BOS, PAD = "<|endoftext|>", "<|begin_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOS, BOS, PAD, IM_START, IM_END)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                    model_max_length: int | None = None) -> Tokenizer:
    """A byte-level BPE of exactly `vocab_size` tokens (fewer when the text has too few merges).

    Documents are encoded without BOS (`add_bos_token` false); the data pipeline
    appends EOS to each. The chat template is ChatML.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab size {vocab_size} is below {MIN_VOCAB_SIZE} "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, special={"bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
                     chat_template=CHATML_TEMPLATE, add_bos_token=False, add_eos_token=False,
                     model_max_length=model_max_length, source="trained BPE")
