"""Supervised fine-tuning data: chats -> token ids with an assistant-only loss mask -> packed rows.

Records are JSONL lines, either a chat or a prompt/completion pair:

    {"messages": [{"role": "system", "content": ...}, {"role": "user", ...},
                  {"role": "assistant", "content": ...}, ...]}
    {"prompt": "...", "completion": "..."}     (a user turn and the assistant's reply)

With no data files the data is the shipped docstrings task
(`flaxlm.model.docstrings.docstring_examples`, the function `flaxlm eval --task
docstrings` scores): the user turn is the example's prompt, the assistant's
reply its reference; its "train" split trains and its "test" split is held out.

A chat is rendered with the tokenizer's chat template and tokenized without
added special tokens (the template writes them, as HF's `apply_chat_template`).
The loss covers the assistant's content and the token that ends its turn. The
spans come from the template's own rendering, prefix by prefix: for assistant
turn i, the text of `messages[:i]` with the generation prompt is where the reply
starts, the text of `messages[:i + 1]` is where the turn ends, and the text of
`messages[:i]` plus an empty reply gives the template's end-of-turn suffix. A
token is trained when its characters overlap the reply, and so is the first
token of the suffix (the end-of-turn token, e.g. `<|im_end|>` or `<|eot_id|>`).
No token string is searched for, so a tokenizer that merges characters across
the boundary still gets a mask that follows the text (the merged token carries
reply characters: it is trained).

Examples are truncated to seq_len + 1 tokens (counted) and dropped when no
trained token is left (counted), then packed whole, first fit, into rows of
seq_len + 1 tokens with segment ids and per-document positions (grain's packer,
the same row layout as pretraining).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from flaxlm.model.sources import DataError
from flaxlm.model.tokenizer import Tokenizer
from flaxlm.train.data import Batch

TRAIN_ON = ("all", "last")


@dataclasses.dataclass(frozen=True)
class Chat:
    messages: tuple[Mapping[str, Any], ...]
    where: str                      # "FILE:LINE" or "docstrings:NAME", for error messages


# ---------------------------------------------------------------- reading

def read_records(files: Sequence[Path], expected: str) -> list[tuple[dict, str]]:
    """(record, "file:line") of every non-blank line of the JSONL `files`; a line that is
    not a JSON object, an unreadable or empty file is named (`expected`: what an object
    holds, for the message)."""
    records: list[tuple[dict, str]] = []
    for path in files:
        count = len(records)
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
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with {expected}")
            records.append((record, where))
        if len(records) == count:
            raise DataError(f"{path}: empty, no records")
    return records


def read_chats(files: Sequence[Path]) -> list[Chat]:
    """Every record of the JSONL `files`, checked; errors name the file and line."""
    return [_chat(record, where) for record, where in
            read_records(files, "'messages' or 'prompt' and 'completion'")]


def _chat(record: dict, where: str) -> Chat:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            "{'role': ..., 'content': ...}")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{i}] is not a {{'role': str, "
                                f"'content': str}} object: {m!r}")
        return Chat(tuple(messages), where)
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Chat(({"role": "user", "content": prompt},
                     {"role": "assistant", "content": completion}), where)
    raise DataError(f"{where}: needs 'messages' (a chat) or 'prompt' and 'completion' "
                    f"(strings); the record has {sorted(record)}")


def docstring_chats(split: str) -> list[Chat]:
    """The docstrings task's examples of `split` as one-turn chats (prompt -> reference)."""
    from flaxlm.model.docstrings import docstring_examples

    return [Chat(({"role": "user", "content": e.prompt},
                  {"role": "assistant", "content": e.reference}), f"docstrings:{e.name}")
            for e in docstring_examples(split)]


# ---------------------------------------------------------------- the mask

@dataclasses.dataclass(frozen=True)
class Span:
    """Character offsets of one assistant turn in the rendered chat."""

    start: int          # the reply's first character
    content_end: int    # after the reply's last character (the end-of-turn suffix starts here)
    end: int            # after the turn's last character


def _render(tokenizer: Tokenizer, messages, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages),
                                             add_generation_prompt=generation_prompt)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from e


def assistant_spans(tokenizer: Tokenizer, chat: Chat, train_on: str = "all"
                    ) -> tuple[str, list[Span]]:
    """(the rendered chat, the spans of its trained assistant turns: all, or the last)."""
    messages = chat.messages
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{chat.where}: the conversation has no assistant turn "
                        f"(roles: {', '.join(m['role'] for m in messages)})")
    if train_on == "last":
        turns = turns[-1:]
    full = _render(tokenizer, messages, False, chat.where)
    spans = []
    for i in turns:
        before = _render(tokenizer, messages[:i], True, chat.where)
        after = _render(tokenizer, messages[:i + 1], False, chat.where)
        if not (after.startswith(before) and full.startswith(after)):
            raise DataError(
                f"{chat.where}: the chat template does not render this conversation prefix "
                f"by prefix (turn {i}: the text up to it is not a prefix of the whole), so "
                "the assistant's tokens cannot be found; use another template")
        empty = _render(tokenizer, [*messages[:i], {**messages[i], "content": ""}], False,
                        chat.where)
        suffix = empty[len(before):] if empty.startswith(before) else ""
        content_end = len(after) - len(suffix)
        if not after.endswith(suffix) or content_end < len(before):
            content_end = len(after)  # no recognizable suffix: the whole turn is the reply
        spans.append(Span(len(before), content_end, len(after)))
    return full, spans


def encode_chat(tokenizer: Tokenizer, chat: Chat, train_on: str = "all"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n] (int32) of the rendered chat and the loss mask [n] (int32, 1 = the
    token is a target the loss covers)."""
    text, spans = assistant_spans(tokenizer, chat, train_on)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(encoding.ids), bool)
    for span in spans:
        mask |= (starts < span.content_end) & (ends > span.start)      # the reply
        closing = np.flatnonzero((starts >= span.content_end) & (starts < span.end))
        if len(closing):
            mask[closing[0]] = True                                     # its end-of-turn token
    return np.asarray(encoding.ids, np.int32), mask.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Encoded examples ({"tokens", "loss_mask"} of at most seq_len + 1 tokens each)."""

    examples: list[dict[str, np.ndarray]]
    truncated: int                  # longer than seq_len + 1 tokens: cut
    dropped: int                    # no trained token (after the cut): left out

    def summary(self, what: str) -> str:
        return (f"{what}: {len(self.examples)} examples, {self.truncated} truncated to fit "
                f"data.seq_len, {self.dropped} dropped (no trained token left)")


def encode_chats(chats: Sequence[Chat], tokenizer: Tokenizer, seq_len: int,
                 train_on: str = "all") -> Encoded:
    examples, truncated, dropped = [], 0, 0
    for chat in chats:
        ids, mask = encode_chat(tokenizer, chat, train_on)
        if len(ids) > seq_len + 1:
            ids, mask, truncated = ids[:seq_len + 1], mask[:seq_len + 1], truncated + 1
        if not mask[1:].any():  # the first token of a row is never a target
            dropped += 1
            continue
        examples.append({"tokens": ids, "loss_mask": mask})
    return Encoded(examples, truncated, dropped)


# ---------------------------------------------------------------- packing

def _packed(examples: grain.IterDataset, seq_len: int, bins: int, seed: int,
            shuffle: bool) -> grain.IterDataset:
    length = {"tokens": seq_len + 1, "loss_mask": seq_len + 1}
    return grain.experimental.FirstFitPackIterDataset(
        examples, length_struct=length, num_packing_bins=bins, seed=seed,
        shuffle_bins=shuffle, meta_features=("loss_mask",))


def _to_batch(rows: dict[str, np.ndarray], shape: tuple[int, ...]) -> Batch:
    def field(name: str) -> np.ndarray:
        return np.asarray(rows[name]).astype(np.int32).reshape(*shape, -1)

    return Batch(tokens=field("tokens"), segment_ids=field("tokens_segment_ids"),
                 positions=field("tokens_positions"), loss_mask=field("loss_mask"))


def _check_examples(examples: Sequence, what: str) -> None:
    if not examples:
        raise DataError(f"the {what} split has no example with a trained token")


def sft_train_dataset(examples: Sequence[dict[str, np.ndarray]], *, seq_len: int,
                      grad_accum: int, micro_batch: int, seed: int) -> grain.IterDataset:
    """Endless packed batches [grad_accum, micro_batch, seq_len + 1] (tokens, segment ids,
    positions, loss mask), shuffled by `seed` every epoch."""
    _check_examples(examples, "training")
    rows = grad_accum * micro_batch
    dataset = grain.MapDataset.source(list(examples)).shuffle(seed=seed).repeat()
    packed = _packed(dataset.to_iter_dataset(), seq_len, rows, seed, shuffle=True)
    return packed.batch(rows, drop_remainder=True).map(
        lambda r: _to_batch(r, (grad_accum, micro_batch)))


def sft_eval_batches(examples: Sequence[dict[str, np.ndarray]], *, seq_len: int,
                     batch_size: int, max_batches: int) -> list[Batch]:
    """The first `max_batches` packed batches [batch_size, seq_len + 1] of the held-out
    examples, in order; the last one padded (segment id 0) to full size."""
    if not examples:
        return []
    dataset = grain.MapDataset.source(list(examples)).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    iterator = iter(_packed(dataset, seq_len, batch_size, 0, shuffle=False).batch(batch_size))
    batches = []
    for rows in iterator:
        pad = batch_size - len(rows["tokens"])
        rows = {k: np.pad(np.asarray(v), ((0, pad), (0, 0))) for k, v in rows.items()}
        batches.append(_to_batch(rows, (batch_size,)))
        if len(batches) == max_batches:
            break
    return batches
