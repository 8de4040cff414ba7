"""flaxlm.infer: what uses weights — compiled prefill/decode, sampling, the LLM API."""

from flaxlm.infer.beam import BeamParams
from flaxlm.infer.conversation import Conversation
from flaxlm.infer.engine import LoopState, Programs, decode_step, prefill
from flaxlm.infer.generate import Completion
from flaxlm.infer.llm import LLM, GenerationResult, majority_vote
from flaxlm.infer.sampling import SamplingParams
from flaxlm.infer.scoring import Loglikelihood, RollingLoglikelihood

__all__ = ["LLM", "BeamParams", "Completion", "Conversation", "GenerationResult", "Loglikelihood", "LoopState", "Programs",
           "RollingLoglikelihood", "SamplingParams", "decode_step", "majority_vote", "prefill"]
