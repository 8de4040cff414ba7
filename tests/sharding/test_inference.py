"""Sharded inference (8 CPU devices) gives the tokens of unsharded inference."""

import jax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from flaxlm.infer import LLM, BeamParams, SamplingParams
from flaxlm.model import ConfigError, load
from flaxlm.model.cli import main
from flaxlm.model.sharding import MESH_AXES
from tests.hf_models import make_hf_model, save_tokenizer

PROMPTS = ["The quick brown fox", "Hello, world! 12345 def main():", "def"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
BEAMS = BeamParams(num_beams=4, num_return_sequences=2, max_new_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_hf_model("llama-gqa", seed=7).save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, 320)
    return directory


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = LLM.load(model_dir)
    return {"greedy": llm.generate(PROMPTS, GREEDY), "beams": llm.generate(PROMPTS, BEAMS),
            "sampled": llm.generate(PROMPTS, SamplingParams(temperature=0.9, top_p=0.9, seed=3,
                                                            max_new_tokens=16))}


@pytest.mark.parametrize("mesh", ["tensor=2,data=4", "data=2,fsdp=2,tensor=2", {"fsdp": 8}])
def test_sharded_generation_equals_unsharded(model_dir, reference, mesh):
    llm = LLM.load(model_dir, mesh=mesh)
    kernel = llm.programs.state["layers"][0]["attn"]["q_proj"]["kernel"].get_value()
    assert kernel.sharding.spec == P("fsdp", "tensor", None)
    assert len(kernel.sharding.device_set) == 8
    for name, params in (("greedy", GREEDY), ("beams", BEAMS)):
        got = llm.generate(PROMPTS, params)
        for ours, ref in zip(got, reference[name]):
            assert [o.token_ids for o in ours.outputs] == [o.token_ids for o in ref.outputs], name
    sampled = llm.generate(PROMPTS, SamplingParams(temperature=0.9, top_p=0.9, seed=3,
                                                   max_new_tokens=16))
    assert [r.token_ids for r in sampled] == [r.token_ids for r in reference["sampled"]]


def test_explicit_axes_mesh_generates_the_unsharded_tokens(model_dir, reference):
    """`jax.make_mesh` makes Explicit axes by default: such a mesh works as an Auto one, and
    the caller's mesh and model are left as they were."""
    mesh = jax.make_mesh((4, 1, 1, 2), MESH_AXES)
    assert set(mesh.axis_types) == {AxisType.Explicit}
    model, tokenizer = load(model_dir)
    llm = LLM(model, tokenizer, mesh=mesh)
    kernel = llm.programs.state["layers"][0]["attn"]["q_proj"]["kernel"].get_value()
    assert kernel.sharding.spec == P("fsdp", "tensor", None)
    assert len(kernel.sharding.device_set) == 8
    # The caller's model is not resharded in place: the programs hold new state.
    assert len(model.layers[0].attn.q_proj.kernel.get_value().sharding.device_set) == 1
    for name, params in (("greedy", GREEDY), ("beams", BEAMS)):
        got = llm.generate(PROMPTS, params)
        for ours, ref in zip(got, reference[name]):
            assert [o.token_ids for o in ours.outputs] == [o.token_ids for o in ref.outputs], name
    streamed = llm.stream(PROMPTS[0], GREEDY)
    assert "".join(streamed) == reference["greedy"][0].text


def test_stream_on_a_mesh_from_the_cli(model_dir, reference, capsys):
    """`flaxlm generate --mesh data=4,tensor=2 --stream`: the unsharded greedy text."""
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPTS[0], "--stream",
                 "--temperature", "0", "--max-new-tokens", "24", "--ignore-eos",
                 "--mesh", "data=4,tensor=2"]) == 0
    out = capsys.readouterr()
    assert out.out == reference["greedy"][0].text and "[24 tokens" in out.err


def test_bad_mesh_errors_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="has 6 devices, but 8 are available"):
        LLM.load(tmp_path / "not-even-there", mesh={"data": 3, "tensor": 2})


def test_indivisible_heads_named(model_dir):
    model, tokenizer = load(model_dir)  # 2 kv heads
    with pytest.raises(ConfigError, match=r"k_proj.kernel of shape .* not divisible by mesh axis "
                                          r"'tensor' of size 8"):
        LLM(model, tokenizer, mesh="tensor=8")


def test_sharded_scoring_equals_unsharded(model_dir):
    requests = [("The quick brown", " fox"), ("The quick brown", " dog jumps"), ("Hello", ", world")]
    texts = ["def main():\n    return 42\n" * 3, "Hello, world!"]
    plain = LLM.load(model_dir)
    sharded = LLM.load(model_dir, mesh="data=2,fsdp=2,tensor=2")
    for a, b in zip(plain.loglikelihood(requests), sharded.loglikelihood(requests)):
        assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-5)
        assert a.is_greedy == b.is_greedy
    assert sharded.embed(texts) == pytest.approx(plain.embed(texts), abs=1e-5)
