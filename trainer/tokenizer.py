"""GPT-2's byte-pair encoding, offline.

`tiktoken.get_encoding("gpt2")` downloads its vocabulary from the web on first use, which cluster nodes
and these machines cannot reach. The same 50,257 ranks (r50k_base, identical to GPT-2's encoder.json +
vocab.bpe) ship in `assets/gpt2.tiktoken`, taken from the MIT-licensed `openai-whisper` source distribution
on PyPI (whisper/assets/gpt2.tiktoken). Its sha256 equals the hash tiktoken itself pins for r50k_base, and
we check it on load, so a damaged file can never tokenise silently differently.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

VOCAB_FILE = Path(__file__).parent / "assets" / "gpt2.tiktoken"
# tiktoken_ext/openai_public.py: expected_hash of r50k_base.tiktoken.
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation regex, as in tiktoken_ext/openai_public.py (gpt2 and r50k_base share it).
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 50256  # <|endoftext|>, the document separator
VOCAB_SIZE = 50257


@functools.cache
def gpt2() -> tiktoken.Encoding:
    """The GPT-2 encoding, built from the bundled vocabulary without touching the network."""
    digest = hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest()
    if digest != VOCAB_SHA256:
        raise RuntimeError(
            f"{VOCAB_FILE} is damaged (sha256 {digest[:12]}…, expected {VOCAB_SHA256[:12]}…): "
            "restore it with `git checkout -- trainer/assets/gpt2.tiktoken`"
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=PAT_STR,
        mergeable_ranks=load_tiktoken_bpe(str(VOCAB_FILE), expected_hash=VOCAB_SHA256),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )
