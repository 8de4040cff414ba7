"""Rollouts for reinforcement learning on the compiled inference programs.

`Rollouts(model, tokenizer)` builds the sampler's `Programs` once; `set_weights(state)`
hands it the policy's current weights (an `nnx.State` of the same structure as
`nnx.split(model)[1]`, device arrays, no host copy), and `sample` draws `n` completions
per prompt with the while_loop program. The weights are an argument of the compiled
programs, so new weights of the same shapes compile nothing (`num_compiled` stays put);
the batch is padded to the sampler's buckets, so a fixed number of prompts per step
compiles one program.

flaxlm.train finds this class through the `flaxlm.rollouts` entry point (train and
infer do not import each other).
"""

from __future__ import annotations

import dataclasses
import time

from flax import nnx

from flaxlm.infer.engine import Programs
from flaxlm.infer.generate import Row, run_batch
from flaxlm.infer.sampling import SamplingParams
from flaxlm.model.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Sample:
    prompt: int                 # the prompt's index in the call
    token_ids: list[int]        # the completion (its end-of-sequence token included)
    text: str


class Rollouts:
    def __init__(self, model: nnx.Module, tokenizer: Tokenizer):
        self.programs = Programs(model)
        self.tokenizer = tokenizer
        self.eos_ids = tuple(tokenizer.eos_token_ids)
        self.seconds = 0.0          # time spent sampling, summed

    @property
    def num_compiled(self) -> int:
        return self.programs.num_compiled

    def set_weights(self, state: nnx.State) -> None:
        """The policy's weights for the next samples (same tree as the model's state)."""
        self.programs.state = state

    def sample(self, prompts: list[list[int]], *, n: int, max_new_tokens: int,
               temperature: float, seed: int) -> list[Sample]:
        """n completions of each prompt (token ids), prompt by prompt; sample j of prompt i
        draws from fold_in(PRNGKey(seed + i), j)."""
        rows = [Row(prompt_ids=tuple(p), eos_ids=self.eos_ids, sample_index=j,
                    params=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                          seed=seed + i, logprobs=None))
                for i, p in enumerate(prompts) for j in range(n)]
        start = time.perf_counter()
        done, _ = run_batch(self.programs, self.tokenizer, rows)
        self.seconds += time.perf_counter() - start
        return [Sample(prompt=k // n, token_ids=list(c.token_ids), text=c.text)
                for k, c in enumerate(done)]
