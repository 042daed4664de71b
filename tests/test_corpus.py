"""The embedded corpus's reading (trainer/embedded.py): its fast comment scanner and statement-only walk give
exactly what tokenize and ast.walk give, and files read in parallel come back in order. That the whole
corpus's shards stayed byte for byte the same was checked by preparing it before and after (trainer/embedded.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trainer.embedded import (
    DEFINITIONS,
    _tokenized_comment_blocks,
    comment_blocks,
    read,
    source_documents,
    stdlib_files,
)

TRICKY = [
    "# a\n# b\nx = 1\n# c\n# d",  # two blocks; the file ends inside the second, without a newline
    "x = 1  # after code\n# continues the block\n\n# blank lines do not end it\ny = 2\n",
    's = "# not a comment"  # but this is\n# and this\n',
    "t = '''\n# inside a string\n'''\n# one\n# two\n",
    'u = ("a"  # between\n     # two implicitly joined strings\n     "b")\n',
    "v = 1 + \\\n    2  # after a line continuation\n# next\n",
    "w = r'\\'' # a raw string's escaped quote\n# x\n",
    "class A:\n    # indented\n# dedented\n    pass\n# after the dedent\n# ends the file\n",
    "# crlf one\r\n# crlf two\r\nx = 1\r\n# three\r\n# four\r\n",
    "# a lone carriage return\r# is one comment line to tokenize\nx = 1\n# c\n# d\n",  # left to tokenize
    'f = f"{x!r:>10} # no"  # yes\n# yes too\n',
    "b = b'#'\n# p\n# q\n",
    "\x0c# after a form feed\n# and another\n",
    "if x:\n    pass\n    # in a block\n    # second\nelse:\n    pass\n",
    "z = '''a ''' '' \"\"\"b\"\"\"  # strings of every quoting\n# then\n# more\n",
    "q = 'it\\'s # still a string'  # c1\n# c2\n",
    "def f():\n    '''Doc.'''\n    return 1  # r\n\n\n# far below\n",
]


@pytest.mark.parametrize("source", TRICKY)
def test_comment_blocks_are_tokenizes(source):
    ast.parse(source)  # every case is valid Python: the only sources the corpus scans
    raw = source.encode()
    assert comment_blocks(raw) == list(_tokenized_comment_blocks(raw))


def reference(path: Path) -> tuple[int, list[str]]:
    """What embedded_corpus read from a file before: ast.walk over every node, and tokenize."""
    source = path.read_bytes()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return len(source), []
    docs = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, DEFINITIONS)]
    return len(source), [d for d in docs if d and len(d) > 40] + list(_tokenized_comment_blocks(source))


def test_a_sample_of_the_standard_library_reads_as_before_and_in_order_in_parallel():
    files = stdlib_files()[::40]  # ~45 files across the library, a few of them deliberately broken
    expected = [reference(p) for p in files]
    assert sum(bool(docs) for _, docs in expected) > 30
    assert [source_documents(p) for p in files] == expected
    assert list(read(files, workers=2)) == expected
