"""Tokenise a corpus into train / val / test token shards.

    python -m trainer.prepare embedded --out data/embedded            # offline English, any Python, ~1.2M tokens
    python -m trainer.prepare files a.txt b.jsonl dir/ --out data/mine # .txt, .jsonl (field "text"), .parquet
    python -m trainer.prepare fineweb --out data/fineweb10B            # FineWeb sample-10BT from the HF hub

Every document is preceded by <|endoftext|> (as GPT-2 and llm.c do) and goes whole to one split, chosen by
a hash of its text: the assignment needs no randomness, is the same however the corpus is ordered or read
(streaming included), and identical documents can never straddle train and test.
meta.json is written last: a directory without it is an interrupted preparation.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import shlex
import sys
import sysconfig
import time
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from trainer.data import SPLITS, write_shard
from trainer.rundir import write_json
from trainer.tokenizer import EOT, gpt2

FINEWEB_REPO = "HuggingFaceFW/fineweb"
FINEWEB_SAMPLE = "sample/10BT"


# ---------------------------------------------------------------------------------------------------------
# Sources: each yields documents (strings).


def embedded_corpus() -> Iterator[str]:
    """English prose that exists on any machine with Python and no network (~1.2M GPT-2 tokens on 3.11).

    The interpreter's help topics (pydoc_data, ~140K tokens), then every docstring and every comment block
    of two or more lines in the standard library's sources, in sorted file order. It varies a little
    between Python versions, so meta.json records the version and a hash of the tokens.
    """
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts):
        source = path.read_bytes()
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):  # the stdlib's deliberately broken test files
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    yield doc
        yield from _comment_blocks(source)


def _comment_blocks(source: bytes) -> Iterator[str]:
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


def file_corpus(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Documents from .txt (one per file), .jsonl (one per line) and .parquet (one per row) files or dirs."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".parquet"))
        elif p.exists():
            files.append(p)
        else:
            raise SystemExit(f"error: input {p} does not exist")
    if not files:
        raise SystemExit("error: no .txt, .jsonl or .parquet files among the inputs")
    for f in files:
        if f.suffix == ".parquet":
            yield from parquet_documents(f, text_field)
        elif f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[text_field]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise SystemExit(
                                f"error: {f}:{n} is not a JSON object with a {text_field!r} field "
                                "(choose the field with --text-field)"
                            ) from None
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def parquet_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Rows of a Parquet file's text column, read a row group at a time (FineWeb files are ~2 GB)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise SystemExit(f"error: {path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def fineweb_corpus(sample: str = FINEWEB_SAMPLE, cache_dir: str | None = None) -> Iterator[str]:
    """FineWeb's sample files from the Hugging Face hub, in the hub's file order, downloaded one at a time."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise SystemExit("error: the FineWeb download needs huggingface_hub: pip install 'orch[hub]'") from None
    files = sorted(
        f
        for f in HfApi().list_repo_files(FINEWEB_REPO, repo_type="dataset")
        if f.startswith(sample + "/") and f.endswith(".parquet")
    )
    if not files:
        raise SystemExit(f"error: no Parquet files under {sample!r} in {FINEWEB_REPO}")
    for name in files:
        local = hf_hub_download(FINEWEB_REPO, name, repo_type="dataset", cache_dir=cache_dir)
        yield from parquet_documents(Path(local))


# ---------------------------------------------------------------------------------------------------------
# Tokenise and shard.


def split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


class ShardWriter:
    """Buffers one split's tokens and writes a shard every `shard_tokens` tokens."""

    def __init__(self, out: Path, split: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = self.index = self.total = 0

    def add(self, tokens: list[int]) -> None:
        arr = np.asarray(tokens, dtype=np.uint16)
        while arr.size:
            take = min(arr.size, self.shard_tokens - self.fill)
            self.buf[self.fill : self.fill + take] = arr[:take]
            self.fill += take
            arr = arr[take:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            write_shard(self.out / f"{self.split}_{self.index:06d}.bin", self.buf[: self.fill])
            self.total += self.fill
            self.index += 1
            self.fill = 0


def prepare(
    documents: Iterable[str],
    out: str | Path,
    *,
    source: str,
    command: str,
    val_fraction: float,
    test_fraction: float,
    shard_tokens: int = 100_000_000,
    max_tokens: int | None = None,
    batch_docs: int = 256,
    progress: bool = True,
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten at the end
    for old in out.glob("*.bin"):
        old.unlink()
    enc = gpt2()
    writers = {s: ShardWriter(out, s, shard_tokens) for s in SPLITS}
    digest = hashlib.sha256()
    docs = tokens = 0
    t0 = shown = time.time()

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for doc in documents:
            batch.append(doc)
            if len(batch) == batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch

    for batch in batches():
        for text, ids in zip(batch, enc.encode_ordinary_batch(batch, num_threads=4)):
            ids = [EOT] + ids
            writers[split_of(text, val_fraction, test_fraction)].add(ids)
            digest.update(np.asarray(ids, dtype=np.uint16).tobytes())
            docs += 1
            tokens += len(ids)
        if progress and time.time() - shown > 2:
            shown = time.time()
            print(
                f"\r{docs:,} documents, {tokens:,} tokens, {tokens / (time.time() - t0 + 1e-9):,.0f} tokens/s",
                end="",
                file=sys.stderr,
                flush=True,
            )
        if max_tokens is not None and tokens >= max_tokens:
            break
    if progress:
        print(file=sys.stderr)
    for w in writers.values():
        w.flush()
    empty = [s for s, w in writers.items() if w.total == 0]
    if empty:
        raise SystemExit(f"error: split(s) {', '.join(empty)} got no documents: use more input or larger fractions")
    meta = {
        "source": source,
        "command": command,
        "tokenizer": "gpt2",
        "documents": docs,
        "tokens": {s: w.total for s, w in writers.items()},
        "shards": {s: w.index for s, w in writers.items()},
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "sha256": digest.hexdigest(),
        "python": sys.version.split()[0],
    }
    write_json(out / "meta.json", meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m trainer.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", choices=["embedded", "files", "fineweb"])
    parser.add_argument("inputs", nargs="*", help="files or directories (for 'files')")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--val-fraction", type=float, default=None, help="share of documents for validation")
    parser.add_argument("--test-fraction", type=float, default=None, help="share of documents for the test set")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after about this many tokens")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    parser.add_argument("--sample", default=FINEWEB_SAMPLE, help="FineWeb sample folder on the hub")
    args = parser.parse_args(argv)
    # The small embedded corpus needs larger held-out shares to fill the tiny preset's evaluation slices.
    small = args.source == "embedded"
    val = args.val_fraction if args.val_fraction is not None else (0.02 if small else 0.005)
    test = args.test_fraction if args.test_fraction is not None else (0.05 if small else 0.005)
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        parser.error("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
    if args.source == "files" and not args.inputs:
        parser.error("'files' needs at least one input file or directory")
    if args.source == "embedded":
        docs = embedded_corpus()
    elif args.source == "files":
        docs = file_corpus(args.inputs, args.text_field)
    else:
        docs = fineweb_corpus(args.sample)
    command = shlex.join(["python", "-m", "trainer.prepare", *argv])
    meta = prepare(
        docs,
        args.out,
        source=args.source,
        command=command,
        val_fraction=val,
        test_fraction=test,
        shard_tokens=args.shard_tokens,
        max_tokens=args.max_tokens,
    )
    print(f"wrote {args.out}: " + ", ".join(f"{s} {n:,} tokens" for s, n in meta["tokens"].items()))


if __name__ == "__main__":
    main()
