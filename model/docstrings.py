"""The docstring task: standard-library functions and the first sentence of their docstrings.

Built offline from the Python standard library of the running interpreter
(`sysconfig`'s stdlib path), parsed with `ast` (no module is imported), so it
is the same on every machine with the same Python. `flaxlm.eval` scores it
(the `docstrings` task) and `flaxlm.train` fine-tunes on its train split: both
call `docstring_examples`, so they see the same examples and the same split.
It lives in `flaxlm.model` because train and infer/eval may not import each
other (DESIGN.md), and it needs nothing but the standard library.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import re
import sysconfig
import textwrap
from pathlib import Path

from flaxlm.model.errors import ConfigError

INSTRUCTION = "Write the docstring of this Python function: one sentence that says what it does."
SPLITS = ("train", "test")
HELD_OUT_PERCENT = 10   # of qualified names, by hash, in the "test" split
MAX_SOURCE_CHARS = 1500
MAX_SOURCE_LINES = 40
REFERENCE_CHARS = (16, 200)
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s|$)")


@dataclasses.dataclass(frozen=True)
class DocstringExample:
    """One function: its source without the docstring, and its docstring's first sentence."""

    name: str       # qualified name, e.g. "json.decoder.JSONDecoder.decode"
    source: str     # the function's source (decorators included), dedented, docstring removed
    reference: str  # the first sentence of its docstring, on one line
    split: str      # "train" or "test"
    module: str = ""  # the module's dotted name, e.g. "json.decoder"

    @property
    def prompt(self) -> str:
        """The instruction and the code: what a model is given."""
        return f"{INSTRUCTION}\n\n```python\n{self.source}\n```"

    @property
    def completion_prompt(self) -> str:
        """For a model used without its chat template: ends in opening triple quotes, which
        the reference continues directly (no space between)."""
        return f'{self.prompt}\nDocstring: """'


def docstring_examples(split: str | None = None, root: str | Path | None = None
                       ) -> list[DocstringExample]:
    """The examples of `split` ("train", "test" or None for both), sorted by name.

    Source: every `.py` file under `root` (default: the standard library),
    except those under site-packages, dist-packages and test directories (test,
    tests, idle_test); files that are not UTF-8 or do not parse are skipped.
    Every function or method defined at module or class level (not inside
    another function) that has a docstring is a candidate. Filters:

    - the docstring is not alone in its lines (not on the `def` line, nothing
      after it on its last line) and the function has a body besides it;
    - the source without the docstring is ASCII, at most 1,500 characters and
      40 lines;
    - the reference (the docstring's first paragraph on one line, cut after the
      first ".", "!" or "?" followed by a space or the end) is ASCII and 16-200
      characters long;
    - no duplicates: of several functions with the same qualified name or the
      same source, only the first by file order is kept.

    Split: a function is held out ("test") when the first 8 bytes of the
    SHA-256 of its qualified name, as an integer, modulo 100 are below 10; the
    rest is "train". The split depends on nothing but the name.
    """
    if split not in (None, *SPLITS):
        raise ConfigError(f"docstring split must be one of {SPLITS} or None, got {split!r}")
    examples = _all_examples(str(root) if root is not None else sysconfig.get_paths()["stdlib"])
    return [e for e in examples if split is None or e.split == split]


def first_sentence(text: str) -> str:
    """The first sentence of a docstring's first paragraph, whitespace collapsed to single spaces."""
    paragraph = textwrap.dedent(text).strip().split("\n\n", 1)[0]
    line = " ".join(paragraph.split())
    match = _SENTENCE.match(line)
    return match.group(1) if match else line


def split_of(name: str) -> str:
    digest = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return "test" if digest % 100 < HELD_OUT_PERCENT else "train"


@functools.lru_cache(maxsize=4)
def _all_examples(root: str) -> tuple[DocstringExample, ...]:
    base = Path(root)
    files = sorted(p for p in base.rglob("*.py")
                   if not _SKIPPED_DIRS & set(p.relative_to(base).parts[:-1]))
    seen_names: set[str] = set()
    seen_sources: set[str] = set()
    examples = []
    for path in files:
        for example in _file_examples(path, _module_name(path, base)):
            if example.name in seen_names or example.source in seen_sources:
                continue
            seen_names.add(example.name)
            seen_sources.add(example.source)
            examples.append(example)
    return tuple(sorted(examples, key=lambda e: e.name))


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def _file_examples(path: Path, module: str):
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return
    lines = text.splitlines()
    for qualname, node in _functions(tree.body, ""):
        example = _example(node, lines, f"{module}.{qualname}")
        if example is not None:
            yield dataclasses.replace(example, module=module)


def _functions(body: list[ast.stmt], prefix: str):
    """(qualified name, node) of functions at module or class level, in order."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node.body, f"{prefix}{node.name}.")


def _example(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], name: str
             ) -> DocstringExample | None:
    docstring = ast.get_docstring(node, clean=True)
    if not docstring or len(node.body) < 2:
        return None
    doc, after = node.body[0], node.body[1]
    own_lines = (lines[doc.lineno - 1][:doc.col_offset].strip() == ""
                 and after.lineno > doc.end_lineno)
    if not own_lines:
        return None
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    kept = lines[start - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    source = textwrap.dedent("\n".join(kept)).rstrip()
    reference = first_sentence(docstring)
    if not (source.isascii() and reference.isascii()) or len(source) > MAX_SOURCE_CHARS \
            or source.count("\n") >= MAX_SOURCE_LINES \
            or not REFERENCE_CHARS[0] <= len(reference) <= REFERENCE_CHARS[1]:
        return None
    return DocstringExample(name=name, source=source, reference=reference, split=split_of(name))
