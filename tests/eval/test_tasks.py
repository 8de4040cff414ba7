"""Generation, perplexity and docstring tasks on a tiny model; the `flaxlm eval` command."""

import ast
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxlm.eval.task import EvalError, Settings
from flaxlm.eval.tasks import make_task
from flaxlm.infer.sampling import SamplingParams
from flaxlm.model.cli import main
from flaxlm.model.docstrings import docstring_examples, first_sentence, split_of

PROMPTS = ["The quick brown", "Hello, world!", "def main():"]


def test_generation_exact_match_and_rouge(tmp_path, tiny_llm):
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    texts = [r.text for r in tiny_llm.generate(PROMPTS, greedy)]
    lines = [{"prompt": PROMPTS[0], "references": ["something else", texts[0]]},
             {"prompt": PROMPTS[1], "reference": "not this"},
             {"messages": [{"role": "user", "content": "hi"}], "references": ["x"]}]
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines[:2]))
    result = make_task(f"gen:{path}", Settings(max_new_tokens=6, log_samples=True)).run(
        tiny_llm, lambda n: None)
    assert [s["prediction"] for s in result.samples] == texts[:2]
    assert result.metrics["exact_match"].value == pytest.approx(0.5)
    assert result.samples[0]["score"] == pytest.approx(1.0)  # ROUGE-L of an exact match
    assert {"rouge1", "rouge2", "rougeL", "bleu", "chrf"} <= set(result.metrics)


def test_generation_bad_examples_name_the_line(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text('{"prompt": "a", "references": ["b"]}\n{"prompt": "a", "references": [" "]}\n')
    with pytest.raises(EvalError, match="gen.jsonl:2: the example has an empty reference"):
        make_task(f"gen:{path}", Settings())


def test_perplexity_over_text_jsonl_and_parquet(tmp_path, tiny_llm):
    docs = ["The quick brown fox jumps over the lazy dog.", "Hello, world! 12345",
            "def main():\n    return 42\n"]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": docs[1]}) + "\n")
    pq.write_table(pa.table({"text": [docs[2]]}), tmp_path / "c.parquet")
    result = make_task(f"perplexity:{tmp_path}/*,window=16,stride=8", Settings()).run(
        tiny_llm, lambda n: None)
    rolled = tiny_llm.loglikelihood_rolling(docs, window=16, stride=8)
    logprob = sum(r.logprob for r in rolled)
    tokens = sum(r.num_tokens for r in rolled)
    nbytes = sum(len(d.encode()) for d in docs)
    words = sum(len(d.split()) for d in docs)
    m = result.metrics
    assert m["token_perplexity"].value == pytest.approx(math.exp(-logprob / tokens), rel=1e-6)
    assert m["bits_per_byte"].value == pytest.approx(-logprob / nbytes / math.log(2), rel=1e-6)
    assert m["word_perplexity"].value == pytest.approx(math.exp(-logprob / words), rel=1e-6)
    assert result.info["tokens"] == tokens and result.num_examples == 3


def _module(root, name, text):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_docstring_examples_filters_and_split(tmp_path):
    _module(tmp_path, "pkg/util.py", (
        'def add(a, b):\n    """Return the sum of a and b. More text here."""\n    return a + b\n\n'
        'def bare(x):\n    """Only a docstring, no body."""\n\n'
        'class Box:\n    @property\n    def size(self):\n        """\n        Give the size of '
        'this box\n        in cubits.\n\n        Details.\n        """\n        return 3\n\n'
        'def short(x):\n    """Too short."""\n    return x\n\n'
        'def inline(x): """Docstring on the def line, skipped."""; return x\n\n'
        'def accent(x):\n    """Return the caf\u00e9 price of x."""\n    return x\n'))
    _module(tmp_path, "pkg/copy.py", 'def add(a, b):\n    """Return the sum of a and b again."""\n'
                                     '    return a + b\n')  # first by path: util.add is dropped
    _module(tmp_path, "test/test_x.py", 'def t():\n    """A test helper function here."""\n'
                                        '    return 1\n')  # test directories are skipped
    examples = docstring_examples(root=tmp_path)
    assert [e.name for e in examples] == ["pkg.copy.add", "pkg.util.Box.size"]
    add, size = examples
    assert add.source == "def add(a, b):\n    return a + b"
    assert add.reference == "Return the sum of a and b again."
    assert size.source == "@property\ndef size(self):\n    return 3"
    assert size.reference == "Give the size of this box in cubits."
    for e in examples:
        assert e.split == split_of(e.name) and e.source in e.prompt
        ast.parse(e.source)


def test_stdlib_docstring_split_is_deterministic_and_held_out():
    train, test = docstring_examples("train"), docstring_examples("test")
    assert len(test) > 200 and 0.05 < len(test) / (len(train) + len(test)) < 0.15
    assert not {e.name for e in train} & {e.name for e in test}
    for e in test[:50] + train[:50]:
        assert e.source.isascii() and e.reference.isascii() and len(e.source) <= 1500
        assert 16 <= len(e.reference) <= 200 and e.reference == first_sentence(e.reference)
    assert len({e.source for e in train + test}) == len(train) + len(test)


def test_cli_docstrings_and_mmlu_print_tables(tmp_path, tiny_dir, capsys):
    for subject in ("anatomy", "law"):
        rows = "".join(f'"{subject} q{i}?",a,b,c,d,{"ABCD"[i % 4]}\n' for i in range(4))
        (tmp_path / f"{subject}_dev.csv").write_text(rows)
        (tmp_path / f"{subject}_test.csv").write_text(rows)
    out = tmp_path / "results.json"
    code = main(["eval", str(tiny_dir), "--task", "docstrings", "--task", f"mmlu:{tmp_path}",
                 "--limit", "3", "--shots", "1", "--max-new-tokens", "8", "--out", str(out),
                 "--log-samples"])
    assert code == 0
    table = capsys.readouterr().out
    for row in ("| docstrings | rougeL |", "| docstrings | loss |", "| mmlu | letter_acc |",
                "| mmlu/anatomy | acc_norm |", "| mmlu/law | acc |"):
        assert row in table
    report = json.loads(out.read_text())
    assert report["settings"]["limit"] == 3 and report["model"] == str(tiny_dir)
    assert len(report["samples"]["docstrings"]) == 3 and len(report["samples"]["mmlu"]) == 6
    stderr = report["tasks"]["mmlu"]["metrics"]["letter_acc"]["stderr"]
    assert stderr is not None and np.isfinite(stderr)


@pytest.mark.parametrize("flags, message", [
    (["--task", "docstrings", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["--task", "mmlu:/no/such/dir"], "task mmlu: /no/such/dir does not exist"),
    (["--task", "docstrings", "--out", "/no/such/dir/out.json"], "--out /no/such/dir/out.json"),
    (["--task", "bogus"], "unknown task kind 'bogus'"),
    (["--task", "docstrings", "--n", "4"], "give --temperature > 0"),
])
def test_bad_command_lines_exit_2_before_loading(flags, message, capsys):
    # "no-such-model" would fail to load: the error must come first, from the flags
    assert main(["eval", "no-such-model", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


class _Answers:
    """An LLM stand-in answering the arithmetic questions in turn: the bare answer, the
    echoed sum, a wrong number, an echoed wrong sum."""

    max_batch = 8

    def __init__(self):
        self.answered = 0

    def chat_prompt_ids(self, messages):
        return messages[0]["content"]

    def generate(self, prompts, params, truncate):
        from types import SimpleNamespace

        from flaxlm.model.arithmetic import parse_problem

        assert params.temperature == 0 and params.max_new_tokens == 16
        out = []
        for text in prompts:
            p = parse_problem(text)
            answers = [f"{p.answer}", f"{p.a} {p.op} {p.b} = {p.answer}", f"{p.answer + 1}",
                       f"{p.a} {p.op} {p.b} = {p.answer + 1}"]
            out.append(SimpleNamespace(text=answers[self.answered % 4]))
            self.answered += 1
        return out


def test_arithmetic_task_is_the_grpo_recipes_held_out_set_and_scores_both_rules():
    from flaxlm.train.grpo import grpo_prompts
    from flaxlm.train.recipe import Recipe

    task = make_task("arithmetic", Settings())
    recipe = Recipe.load("configs/finetune/smollm2-lora-grpo-arithmetic.toml")

    class Chat:  # grpo_prompts renders the chat; only the question text matters here
        def apply_chat_template(self, messages, add_generation_prompt):
            return messages[0]["content"]

        def encode(self, text, add_special_tokens):
            return [1]

    held_out = [p.text for p in grpo_prompts(recipe, Chat())[1]]
    assert [p.prompt for p in task.problems] == held_out and len(held_out) == 128
    result = task.run(_Answers(), lambda n: None)
    assert result.metrics["accuracy"].value == 0.5 and result.metrics["exact"].value == 0.25
    assert result.num_examples == 128


@pytest.mark.parametrize("spec, message", [
    ("arithmetic:split=dev", "split must be one of"),
    ("arithmetic:count=many", "count must be an integer"),
    ("arithmetic:count=500,max_operand=20", "at most"),
    ("arithmetic:operations=-", "operations"),
    ("arithmetic:size=3", "unknown option 'size'"),
])
def test_arithmetic_task_bad_options(spec, message):
    with pytest.raises(EvalError, match=message):
        make_task(spec, Settings())
