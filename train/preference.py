"""Preference data: (prompt, chosen, rejected) -> the two chats' token ids and loss masks.

Records are JSONL lines, a prompt as a string or as the chat so far:

    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"messages": [{"role": "system", ...}, {"role": "user", ...}], "chosen": "...",
     "rejected": "..."}

Each reply is appended to the prompt as the assistant's turn, the chat is rendered
with the tokenizer's chat template and masked as SFT data is
(`flaxlm.train.sft.encode_chat`, the last assistant turn only): a reply's
log-probability, or a reward model's last token, covers the reply and the token
that ends its turn. A pair whose chosen and rejected replies are identical is
counted and dropped; a reply longer than seq_len + 1 tokens is cut (counted), and a
pair with a side left without a trained token is dropped (counted).

With no data files the pairs are the shipped docstring preferences
(`docstring_pairs`). A batch holds pairs as consecutive rows, chosen then rejected
([2 * pairs, seq_len + 1], padding rows have segment id 0): the loss reads row 2i
against row 2i + 1.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from flaxlm.model.sources import DataError
from flaxlm.model.tokenizer import Tokenizer
from flaxlm.train.data import Batch
from flaxlm.train.sft import Chat, encode_chat, read_records


@dataclasses.dataclass(frozen=True)
class Pair:
    messages: tuple[Mapping[str, Any], ...]   # the chat before the reply
    chosen: str
    rejected: str
    where: str                                # "FILE:LINE" or "docstrings:NAME"

    def chat(self, reply: str) -> Chat:
        return Chat((*self.messages, {"role": "assistant", "content": reply}), self.where)


# ---------------------------------------------------------------- reading

def read_pairs(files: Sequence[Path]) -> list[Pair]:
    """Every record of the JSONL `files`, checked; errors name the file and line."""
    return [_pair(record, where) for record, where in
            read_records(files, "'prompt' (or 'messages'), 'chosen' and 'rejected'")]


def _pair(record: dict, where: str) -> Pair:
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise DataError(f"{where}: 'chosen' and 'rejected' must be strings; the record has "
                        f"{sorted(record)}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of {{'role': str, "
                            "'content': str}} objects")
        return Pair(tuple(messages), chosen, rejected, where)
    if isinstance(record.get("prompt"), str):
        return Pair(({"role": "user", "content": record["prompt"]},), chosen, rejected, where)
    raise DataError(f"{where}: needs 'prompt' (a string) or 'messages' (a chat) beside "
                    f"'chosen' and 'rejected'; the record has {sorted(record)}")


def docstring_pairs(split: str) -> list[Pair]:
    """Docstring preferences of `split` (the docstrings task's split). The prompt is the
    task's prompt for a function f; chosen is f's own docstring sentence; rejected is the
    docstring sentence of the next function after f, in the order of qualified names,
    cyclically, among the functions of the same module and the same split whose sentence
    differs from f's. A function whose module has no such other function is left out."""
    from flaxlm.model.docstrings import docstring_examples

    by_module = defaultdict(list)
    for example in docstring_examples(split):
        by_module[example.module].append(example)
    pairs = []
    for group in by_module.values():
        for i, example in enumerate(group):
            others = [group[(i + k) % len(group)] for k in range(1, len(group))]
            other = next((o for o in others if o.reference != example.reference), None)
            if other is not None:
                pairs.append(Pair(({"role": "user", "content": example.prompt},),
                                  example.reference, other.reference,
                                  f"docstrings:{example.name}"))
    return sorted(pairs, key=lambda p: p.where)


def read_prompts(files: Sequence[Path]) -> list[Any]:
    """Prompts of JSONL records {"prompt": str} or {"messages": [...]} (GRPO's data): the
    string, or the messages list; errors name the file and line."""
    prompts: list[Any] = []
    for path in files:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read ({e})") from e
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from e
            if isinstance(record, dict) and isinstance(record.get("prompt"), str):
                prompts.append(record["prompt"])
            elif isinstance(record, dict) and isinstance(record.get("messages"), list):
                prompts.append(record["messages"])
            else:
                raise DataError(f"{where}: needs 'prompt' (a string) or 'messages' (a chat)")
    if not prompts:
        raise DataError(f"{', '.join(map(str, files))}: no prompts")
    return prompts


# ---------------------------------------------------------------- encoding

@dataclasses.dataclass(frozen=True)
class EncodedPairs:
    """Encoded pairs: {"tokens", "loss_mask"} of shape [2, seq_len + 1] (chosen, rejected;
    padded with zeros) and "lengths" [2]."""

    examples: list[dict[str, np.ndarray]]
    identical: int      # chosen == rejected: dropped
    truncated: int      # a side longer than seq_len + 1 tokens: cut
    dropped: int        # a side without a trained token (after the cut): dropped

    def summary(self, what: str) -> str:
        return (f"{what}: {len(self.examples)} pairs, {self.identical} dropped as identical "
                f"(chosen == rejected), {self.truncated} truncated to fit data.seq_len, "
                f"{self.dropped} dropped (no trained token left)")


def encode_pairs(pairs: Sequence[Pair], tokenizer: Tokenizer, seq_len: int) -> EncodedPairs:
    examples, identical, truncated, dropped = [], 0, 0, 0
    width = seq_len + 1
    for pair in pairs:
        if pair.chosen == pair.rejected:
            identical += 1
            continue
        sides = [encode_chat(tokenizer, pair.chat(reply), "last")
                 for reply in (pair.chosen, pair.rejected)]
        if any(len(ids) > width for ids, _ in sides):
            truncated += 1
        sides = [(ids[:width], mask[:width]) for ids, mask in sides]
        if not all(mask[1:].any() for _, mask in sides):  # a row's first token is no target
            dropped += 1
            continue
        tokens, loss_mask = np.zeros((2, width), np.int32), np.zeros((2, width), np.int32)
        for row, (ids, mask) in enumerate(sides):
            tokens[row, :len(ids)], loss_mask[row, :len(ids)] = ids, mask
        lengths = np.array([len(ids) for ids, _ in sides], np.int32)
        examples.append({"tokens": tokens, "loss_mask": loss_mask, "lengths": lengths})
    return EncodedPairs(examples, identical, truncated, dropped)


# ---------------------------------------------------------------- batches

def _to_batch(rows: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> Batch:
    """Stacked pairs [n, 2, width] -> Batch [*shape, width] with rows chosen, rejected, ..."""
    tokens = np.asarray(rows["tokens"])
    width = tokens.shape[-1]
    columns = np.arange(width, dtype=np.int32)
    segments = (columns < np.asarray(rows["lengths"])[..., None]).astype(np.int32)
    positions = np.broadcast_to(columns, tokens.shape).copy()
    return Batch(tokens=tokens.reshape(*shape, width),
                 segment_ids=segments.reshape(*shape, width),
                 positions=positions.reshape(*shape, width),
                 loss_mask=np.asarray(rows["loss_mask"]).reshape(*shape, width))


def pair_train_dataset(examples: Sequence[dict[str, np.ndarray]], *, grad_accum: int,
                       micro_batch: int, seed: int) -> grain.IterDataset:
    """Endless batches [grad_accum, 2 * micro_batch, seq_len + 1] of `micro_batch` pairs
    per micro-batch, shuffled by `seed` every epoch."""
    if not examples:
        raise DataError("the training split has no preference pair left")
    pairs = grad_accum * micro_batch
    dataset = grain.MapDataset.source(list(examples)).shuffle(seed=seed).repeat()
    return dataset.to_iter_dataset().batch(pairs, drop_remainder=True).map(
        lambda r: _to_batch(r, (grad_accum, 2 * micro_batch)))


def pair_eval_batches(examples: Sequence[dict[str, np.ndarray]], *, batch_size: int,
                      max_batches: int) -> list[Batch]:
    """The first `max_batches` batches [2 * batch_size, seq_len + 1] of held-out pairs, in
    order; the last one padded with empty pairs (segment id 0, no trained token)."""
    batches = []
    for start in range(0, min(len(examples), batch_size * max_batches), batch_size):
        chunk = examples[start:start + batch_size]
        rows = {k: np.stack([e[k] for e in chunk]) for k in chunk[0]}
        pad = batch_size - len(chunk)
        rows = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in rows.items()}
        batches.append(_to_batch(rows, (2 * batch_size,)))
    return batches
