"""The lm-eval adapter against lm-eval's own `hf` backend, on the HF export of a tiny model
and local tasks (multiple choice, rolling log-likelihood, generation), offline."""

import json
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest

from flaxlm.eval.harness import FlaxlmLM, check_tasks, task_manager
from flaxlm.eval.task import EvalError

FLAXLM = str(Path(sys.executable).with_name("flaxlm"))
QUESTIONS = [
    {"question": "The quick brown fox", "choices": [" jumps", " sleeps", " runs away"], "answer": 0},
    {"question": "Hello, world!", "choices": [" 12345", " def main():", " The end"], "answer": 2},
    {"question": "def main():", "choices": ["\n    return 42", " pass", " lazy dog"], "answer": 0},
    {"question": "Count 12345", "choices": [" 6789", " fox", " world"], "answer": 1},
    {"question": "The lazy", "choices": [" dog", " cat"], "answer": 0},
    {"question": "return", "choices": [" 42", " 43", " None", " fox"], "answer": 3},
]
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 12, "def main():\n    return 42\n" * 15]


def _yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness-tasks")
    mc, ppl, gen = root / "mc.jsonl", root / "ppl.jsonl", root / "gen.jsonl"
    mc.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    ppl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    gen.write_text("".join(json.dumps({"question": q["question"], "target": "fox"}) + "\n"
                           for q in QUESTIONS[:4]))
    (root / "tiny_mc.yaml").write_text(_yaml("tiny_mc", mc, (
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
    (root / "tiny_ppl.yaml").write_text(_yaml("tiny_ppl", ppl, (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")))
    (root / "tiny_gen.yaml").write_text(_yaml("tiny_gen", gen, (
        "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: target\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    return root


@pytest.fixture(scope="module")
def both(tasks_dir, tiny_dir, tiny_llm):
    names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    manager = task_manager(str(tasks_dir), names)
    common = dict(tasks=names, task_manager=manager, log_samples=True, bootstrap_iters=0)
    hf = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tiny_dir),
                                                         "dtype": "float32"},
                                 batch_size=4, device="cpu", **common)
    ours = lm_eval.simple_evaluate(model=FlaxlmLM(tiny_llm), **common)
    return hf, ours


def _responses(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_matches_hf_backend(both):
    hf, ours = both
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == hf["results"]["tiny_mc"][metric]
    pairs = 0
    for ours_doc, hf_doc in zip(_responses(ours, "tiny_mc"), _responses(hf, "tiny_mc")):
        for (a,), (b,) in zip(ours_doc, hf_doc):
            assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
            pairs += 1
    assert pairs == sum(len(q["choices"]) for q in QUESTIONS)


def test_rolling_loglikelihood_matches_hf_backend(both):
    hf, ours = both
    for ours_doc, hf_doc in zip(_responses(ours, "tiny_ppl"), _responses(hf, "tiny_ppl")):
        assert ours_doc[0][0] == pytest.approx(hf_doc[0][0], abs=1e-4 * 300)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["tiny_ppl"][metric] == pytest.approx(
            hf["results"]["tiny_ppl"][metric], rel=1e-5)


def test_generation_matches_hf_backend(both):
    hf, ours = both
    assert _responses(ours, "tiny_gen") == _responses(hf, "tiny_gen")


def test_cli_harness_prints_lm_eval_table(tasks_dir, tiny_dir, tmp_path):
    out = tmp_path / "harness.json"
    result = subprocess.run([FLAXLM, "eval", str(tiny_dir), "--harness", "tiny_mc",
                             "--include-path", str(tasks_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tiny_mc" in result.stdout and "acc_norm" in result.stdout
    report = json.loads(out.read_text())
    assert "acc,none" in report["harness"]["results"]["tiny_mc"]


def test_unknown_harness_task_names_close_ones(tasks_dir):
    manager = task_manager(str(tasks_dir), ["tiny_mc"])
    with pytest.raises(EvalError, match="unknown lm-evaluation-harness task 'tiny_mcq' "
                                        r"\(did you mean tiny_mc"):
        check_tasks(manager, ["tiny_mcq"])
