"""The data pipeline: file formats, packing, determinism, sharding, resumable position."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flaxlm.train import data as data_lib
from flaxlm.model.sources import DataError, DocumentSource, default_corpus, find_files
from flaxlm.train.tokenizer_train import train_tokenizer

from tests.hf_models import save_tokenizer
from tests.train.conftest import tiny_recipe


@pytest.fixture(scope="module")
def tokenizer(corpus):
    source = DocumentSource(find_files((str(corpus / "*.txt"),)))
    return train_tokenizer((source[i] for i in range(len(source))), 300)


@pytest.fixture(scope="module")
def source(corpus):
    return DocumentSource(find_files((str(corpus / "*.txt"),)))


def _batches(source, tokenizer, count, seed=0, indices=None, state=None, micro_batch=2):
    indices = np.arange(len(source)) if indices is None else indices
    iterator = iter(data_lib.train_dataset(
        source, indices, data_lib.Encoder(tokenizer), seq_len=16, grad_accum=2,
        micro_batch=micro_batch, seed=seed, read_threads=2, prefetch=4))
    if state is not None:
        iterator.set_state(state)
    return [next(iterator) for _ in range(count)], iterator


def test_formats_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first document", "second\ndocument", "third, with unicode: é"]
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)) + "\n")
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet", row_group_size=2)
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text)
    for pattern in ("docs.jsonl", "docs.parquet", "doc*.txt"):
        source = DocumentSource(find_files((str(tmp_path / pattern),)))
        assert [source[i] for i in range(len(source))] == texts, pattern


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "", "empty, no documents"),
    ("empty.jsonl", "\n\n", "empty, no documents"),
    ("bad.jsonl", '{"content": "x"}\n', "no string field 'text'"),
    ("broken.jsonl", '{"text": \n', "not valid JSON"),
    ("fake.parquet", "not parquet", "not a readable Parquet file"),
])
def test_bad_files_are_data_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        DocumentSource(find_files((str(tmp_path / name),)))


def test_parquet_without_the_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "docs.parquet")
    with pytest.raises(DataError, match="no column 'text' .columns: content.; set data.text_field"):
        DocumentSource(find_files((str(tmp_path / "docs.parquet"),)))
    source = DocumentSource(find_files((str(tmp_path / "docs.parquet"),)), text_field="content")
    assert [source[0], source[1]] == ["a", "b"]


def test_missing_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no file matches"):
        find_files((str(tmp_path / "nothing-*.txt"),))


def test_default_corpus_is_the_stdlib_source():
    files = default_corpus()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert any(f.name == "os.py" for f in files)


def test_rows_are_packed_documents_with_eos(source, tokenizer):
    (batch,), _ = _batches(source, tokenizer, 1)
    assert batch.tokens.shape == (2, 2, 17)  # [grad_accum, micro_batch, seq_len + 1]
    eos = tokenizer.eos_token_id
    for tokens, segments, positions in zip(batch.tokens.reshape(4, 17),
                                           batch.segment_ids.reshape(4, 17),
                                           batch.positions.reshape(4, 17)):
        assert segments.min() >= 1  # concat-then-split packing leaves no padding
        starts = np.flatnonzero(np.diff(segments)) + 1
        assert all(positions[s] == 0 for s in starts)
        assert all(tokens[s - 1] == eos for s in starts)  # each document ends with EOS
        for seg in np.unique(segments):
            pos = positions[segments == seg]
            assert np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos)))


def test_shuffle_is_deterministic_and_seeded(source, tokenizer):
    first, _ = _batches(source, tokenizer, 3, seed=1)
    again, _ = _batches(source, tokenizer, 3, seed=1)
    other, _ = _batches(source, tokenizer, 3, seed=2)
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(first, again))
    assert not all(np.array_equal(a.tokens, b.tokens) for a, b in zip(first, other))


def test_resumed_iterator_reads_the_same_batches(source, tokenizer):
    straight, _ = _batches(source, tokenizer, 12)
    _, iterator = _batches(source, tokenizer, 5)
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
    resumed, _ = _batches(source, tokenizer, 7, state=state)
    for a, b in zip(straight[5:], resumed):
        assert np.array_equal(a.tokens, b.tokens)
        assert np.array_equal(a.segment_ids, b.segment_ids)
        assert np.array_equal(a.positions, b.positions)


def test_data_repeats_over_epochs(source, tokenizer):
    """The rows, read in order, are the documents (each + EOS) of one shuffled epoch after
    another, every epoch in a new order."""
    encode = data_lib.Encoder(tokenizer)
    documents = [tuple(encode(source[i])["tokens"]) for i in range(len(source))]
    epoch_tokens = sum(map(len, documents))
    batch_tokens = 2 * 2 * 17  # [grad_accum, micro_batch, seq_len + 1]
    batches, _ = _batches(source, tokenizer, -(-5 * epoch_tokens // (2 * batch_tokens)))  # 2.5 epochs
    stream = np.concatenate([b.tokens.ravel() for b in batches]).tolist()
    ends = [i for i, token in enumerate(stream) if token == encode.eos]
    assert len(ends) >= 2 * len(documents)
    read = [tuple(stream[start + 1:end + 1]) for start, end in zip([-1, *ends], ends)]
    index = {doc: i for i, doc in enumerate(documents)}
    assert len(index) == len(documents)  # the corpus has no duplicate documents
    orders = [[index[doc] for doc in read[k * len(documents):(k + 1) * len(documents)]]
              for k in range(2)]
    for order in orders:
        assert sorted(order) == list(range(len(documents)))  # each document once per epoch
    assert orders[0] != orders[1]


def test_tokenizer_source_names_a_model(source, corpus, tmp_path):
    """tokenizer.source = a model path: the run uses (and keeps in RUN_DIR/tokenizer) that
    model's tokenizer."""
    from flaxlm.model import Tokenizer
    from flaxlm.train.prepare import _tokenizer

    save_tokenizer(tmp_path, 300)
    recipe = tiny_recipe(corpus, tokenizer={"source": str(tmp_path)})
    split = data_lib.split_documents(len(source), 0.1, seed=0)
    (tmp_path / "run").mkdir()
    tokenizer = _tokenizer(recipe, tmp_path / "run", recipe.model_config(), source, split, None)
    model_tokenizer = Tokenizer.from_hf_dir(tmp_path)
    saved = Tokenizer.from_hf_dir(tmp_path / "run" / "tokenizer")
    for tok in (tokenizer, saved):
        assert tok.backend.to_str() == model_tokenizer.backend.to_str()
        assert tok.encode(source[0]) == model_tokenizer.encode(source[0])


def test_split_and_process_shards_are_disjoint():
    split = data_lib.split_documents(100, 0.1, seed=0)
    assert len(split.eval) == 10 and len(split.train) == 90
    assert not set(split.eval) & set(split.train)
    assert np.array_equal(split.eval, data_lib.split_documents(100, 0.1, seed=0).eval)
    shards = [data_lib.process_shard(split.train, i, 4, "training") for i in range(4)]
    assert sorted(np.concatenate(shards).tolist()) == split.train.tolist()
    with pytest.raises(DataError, match="too few"):
        data_lib.split_documents(1, 0.5, seed=0)
    with pytest.raises(DataError, match="fewer than the 8 processes"):
        data_lib.process_shard(np.arange(3), 5, 8, "held-out")


def test_eval_batches_cover_the_held_out_split_once(source, tokenizer):
    indices = np.arange(5)
    batches = data_lib.eval_batches(source, indices, data_lib.Encoder(tokenizer), seq_len=16,
                                    batch_size=4, max_batches=100)
    tokens = sum(len(tokenizer.encode(source[i])) + 1 for i in indices)
    packed = sum(int((b.segment_ids != 0).sum()) for b in batches)
    assert packed == tokens
    assert all(b.tokens.shape == (4, 17) for b in batches)
