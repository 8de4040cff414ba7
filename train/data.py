"""The data pipeline (grain): documents -> tokens + EOS -> packed, shuffled, sharded batches.

    documents (DocumentSource, this process's shard of the training split)
      -> shuffle (seed; reshuffled every epoch) -> repeat
      -> tokenize, append EOS                  (read_threads threads)
      -> concat-then-split packing into rows of seq_len + 1 tokens, with segment
         ids (1, 2, ... per document in the row) and positions (reset per document)
      -> batches [grad_accum, micro_batch / processes, seq_len + 1]

The iterator is a `grain.DatasetIterator`: its `get_state()` is saved with every
checkpoint (grain's orbax handler), so a resumed run reads exactly the batches
an uninterrupted run would have read.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np
from flax import struct

from flaxlm.model.tokenizer import Tokenizer
from flaxlm.model.sources import DataError, DocumentSource


@struct.dataclass
class Batch:
    """Packed token rows; the model reads [..., :-1] and predicts [..., 1:]."""

    tokens: np.ndarray       # [..., seq_len + 1] token ids (int32)
    segment_ids: np.ndarray  # [..., seq_len + 1] 0 for padding, 1, 2, ... per document in a row
    positions: np.ndarray    # [..., seq_len + 1] position within its document
    loss_mask: np.ndarray | None = None  # [..., seq_len + 1] 1 where the token is a target the
                                         # loss covers (fine-tuning: assistant tokens); None: all


@dataclasses.dataclass(frozen=True)
class Split:
    """Document indices of the training and held-out evaluation splits."""

    train: np.ndarray
    eval: np.ndarray


def split_documents(num_documents: int, eval_fraction: float, seed: int) -> Split:
    """A seeded random `eval_fraction` of the documents (at least one) is held out."""
    num_eval = max(1, round(num_documents * eval_fraction)) if eval_fraction > 0 else 0
    if num_documents - num_eval < 1:
        raise DataError(f"{num_documents} document(s): too few to hold out "
                        f"{num_eval} for evaluation and train on the rest")
    order = np.random.default_rng(seed).permutation(num_documents)
    return Split(train=np.sort(order[num_eval:]), eval=np.sort(order[:num_eval]))


def process_shard(indices: np.ndarray, process_index: int, process_count: int,
                  what: str) -> np.ndarray:
    """This data-parallel process's documents: every process_count-th one."""
    shard = indices[process_index::process_count]
    if len(shard) == 0:
        raise DataError(f"the {what} split has {len(indices)} document(s), "
                        f"fewer than the {process_count} processes")
    return shard


class Encoder:
    """Document text -> {"tokens": ids + [EOS]} (BOS first when the tokenizer adds one)."""

    def __init__(self, tokenizer: Tokenizer):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token: documents cannot be separated")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(text)
        return {"tokens": np.asarray([*ids, self.eos], dtype=np.int32)}


class _Subset:
    """The documents of `source` at `indices`, as a random-access source."""

    def __init__(self, source: DocumentSource, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> str:
        return self.source[int(self.indices[index])]


def _packed(documents: grain.MapDataset, encode: Encoder, seq_len: int,
            read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    tokens = documents.map(encode).to_iter_dataset(read_options)
    return grain.experimental.ConcatThenSplitIterDataset(
        tokens, length_struct={"tokens": seq_len + 1})


def _to_batch(rows: dict[str, np.ndarray], shape: tuple[int, ...]) -> Batch:
    def field(name: str) -> np.ndarray:
        return rows[name].astype(np.int32).reshape(*shape, -1)

    return Batch(tokens=field("tokens"), segment_ids=field("tokens_segment_ids"),
                 positions=field("tokens_positions"))


def train_dataset(source: DocumentSource, indices: np.ndarray, encode: Encoder, *,
                  seq_len: int, grad_accum: int, micro_batch: int, seed: int,
                  read_threads: int = 2, prefetch: int = 64) -> grain.IterDataset:
    """Endless packed batches of shape [grad_accum, micro_batch, seq_len + 1].

    micro_batch is this process's share (the global micro batch / process count).
    """
    documents = grain.MapDataset.source(_Subset(source, indices)).shuffle(seed=seed).repeat()
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    rows = _packed(documents, encode, seq_len, options)
    shape = (grad_accum, micro_batch)
    return rows.batch(grad_accum * micro_batch, drop_remainder=True).map(
        lambda r: _to_batch(r, shape))


def eval_batches(source: DocumentSource, indices: np.ndarray, encode: Encoder, *,
                 seq_len: int, batch_size: int, max_batches: int) -> list[Batch]:
    """The first `max_batches` packed batches [batch_size, seq_len + 1] of the held-out
    documents, in order; the last one is padded (segment id 0) to full size."""
    documents = grain.MapDataset.source(_Subset(source, indices))
    synchronous = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    iterator = iter(_packed(documents, encode, seq_len, synchronous).batch(batch_size))
    batches = []
    for rows in iterator:
        pad = batch_size - len(rows["tokens"])
        rows = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in rows.items()}
        batches.append(_to_batch(rows, (batch_size,)))
        if len(batches) == max_batches:
            break
    iterator.close()
    return batches


def first_documents(source: DocumentSource, indices: Sequence[int], max_bytes: int):
    """Texts of the documents at `indices`, in order, until about `max_bytes` of text."""
    total = 0
    for index in indices:
        text = source[int(index)]
        yield text
        total += len(text.encode("utf-8", errors="replace"))
        if total >= max_bytes:
            return
