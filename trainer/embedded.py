"""The embedded corpus's reading (trainer/prepare.py's `embedded`): the interpreter's help topics, then every
docstring and comment block of the standard library's sources, file by file in sorted order.

Reading it means parsing ~1,800 files (31 MB on 3.11): `ast.parse` alone takes ~7.5 s of one core on this
2-core machine, so several processes read the files (`read`), and their documents come back in file order.
Preparing the corpus took 28 s (27.5 s of CPU), ~20 s of it in the pure-Python tokenize module finding the
comments and a walk over every AST node; now 5.4 s with two processes, 9.2 s with one (~10 s of CPU, the BPE
~1 s of it), the same shards byte for byte (`python -m trainer.prepare embedded`, load ~2, 2026-12-05).
"""

from __future__ import annotations

import ast
import gc
import io
import multiprocessing
import os
import re
import sysconfig
import threading
import tokenize
from collections import deque
from collections.abc import Iterator
from pathlib import Path


def topics() -> list[str]:
    """pydoc's help topics (~140K tokens), in the order of their keys."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)


def read(paths: list[Path], workers: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """(size, documents) of each file (source_documents), in order, read by `workers` processes (default:
    one per core)."""
    return _in_order(source_documents, paths, workers)


def _in_order(fn, items: list, workers: int | None) -> Iterator:
    """fn over items in `workers` forked processes, results in the items' order (closing the generator ends
    them). Forked, not spawned: a spawned child re-imports the caller's main module, which a script without
    an `if __name__ == "__main__"` guard would run again; and only while this process runs no other thread,
    whose locks a child could inherit held. Otherwise, or where no process pool can start, one process."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    methods = multiprocessing.get_all_start_methods()
    if workers > 1 and len(items) > 1 and "fork" in methods and threading.active_count() == 1:
        try:
            pool = multiprocessing.get_context("fork").Pool(min(workers, len(items)))
        except OSError:  # a sandbox without /dev/shm's semaphores
            pool = None
        if pool is not None:
            with pool:
                yield from pool.imap(fn, items, chunksize=8)
            return
    yield from map(fn, items)


def source_documents(path: Path) -> tuple[int, list[str]]:
    """(the file's size, its documents): its docstrings (of module, classes and functions, in ast.walk's
    breadth-first order, longer than 40 characters), then its comment blocks; none if it does not parse."""
    source = path.read_bytes()
    collecting = gc.isenabled()
    gc.disable()  # an AST holds no cycles: its ~100k nodes per file would only set off needless collections
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # the stdlib's deliberately broken test files
        return len(source), []
    finally:
        if collecting:
            gc.enable()
    return len(source), [*_docstrings(tree), *comment_blocks(source)]


DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# What a statement can sit in. Statements hold the definitions; expressions never do, so a walk over these
# alone meets the definitions in ast.walk's order (breadth first, fields in order) at ~10% of the nodes.
BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)


def _docstrings(tree: ast.AST) -> Iterator[str]:
    todo = deque([tree])
    while todo:
        node = todo.popleft()
        if isinstance(node, DEFINITIONS):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                yield doc
        for field in node._fields:
            value = getattr(node, field, None)
            if isinstance(value, list):
                todo.extend(v for v in value if isinstance(v, BLOCKS))


# A comment (to the end of the line), or a string literal in any of its four quotings, whose '#' are not
# comments. Leftmost first: whichever of a '#' and a quote comes first decides what the other is.
LEXEME = re.compile(
    r"""\#[^\r\n]*"""
    r"""|'''[^'\\]*(?:(?:\\.|'(?!''))[^'\\]*)*'''"""
    r'''|"""[^"\\]*(?:(?:\\.|"(?!""))[^"\\]*)*"""'''
    r"""|'[^'\\\n]*(?:(?:\\\r\n|\\.)[^'\\\n]*)*'"""
    r'''|"[^"\\\n]*(?:(?:\\\r\n|\\.)[^"\\\n]*)*"''',
    re.DOTALL,
)
CODE = re.compile(r"[^ \t\f\r\n\\]|\\(?!\r?\n)")  # a token's character: not blank, not a line continuation


def comment_blocks(source: bytes) -> list[str]:
    """The runs of two or more comments with no token between them (blank lines and line continuations
    are none), each joined into one document: what tokenize's COMMENT tokens give, found with two regular
    expressions in ~1/25 of tokenize's time (the same blocks for every file of 3.11's standard library;
    tests/test_corpus.py). A lone carriage return, which tokenize keeps inside a comment line, is left to it."""
    encoding, _ = tokenize.detect_encoding(io.BytesIO(source).readline)
    text = source.decode(encoding)
    if text.count("\r") != text.count("\r\n"):
        return list(_tokenized_comment_blocks(source))
    blocks: list[str] = []
    block: list[str] = []
    code, end = False, 0  # a token since the last comment; where the last lexeme ended
    for m in LEXEME.finditer(text):
        if text[m.start()] == "#":
            if code or CODE.search(text, end, m.start()):
                if len(block) >= 2:
                    blocks.append(" ".join(block))
                block = []
            block.append(m.group().lstrip("#").strip())
            code = False
        else:
            code = True  # a string
        end = m.end()
    if len(block) >= 2:  # the file's end is a token (ENDMARKER)
        blocks.append(" ".join(block))
    return blocks


def _tokenized_comment_blocks(source: bytes) -> Iterator[str]:
    block: list[str] = []
    try:
        for tok in tokenize.tokenize(io.BytesIO(source).readline):
            if tok.type == tokenize.COMMENT:
                block.append(tok.string.lstrip("#").strip())
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE):
                if len(block) >= 2:
                    yield " ".join(block)
                block = []
    except (tokenize.TokenError, SyntaxError):
        return
