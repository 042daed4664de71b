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
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from trainer import embedded
from trainer.data import SPLITS, write_shard
from trainer.rundir import write_json
from trainer.tokenizer import EOT, gpt2
from trainer.units import duration

FINEWEB_REPO = "HuggingFaceFW/fineweb"
FINEWEB_SAMPLE = "sample/10BT"


@dataclass
class Meter:
    """How far a source is through its input, for the progress display: `done` of `total` bytes (None: not
    known). A source sets `total` before its first document, from file sizes, and advances `done` as it reads:
    documents are not countable up front without reading them all, and bytes are."""

    total: float | None = None
    done: float = 0.0
    unit: str = "bytes"  # or "documents": a list of documents is its own measure


# ---------------------------------------------------------------------------------------------------------
# Sources: each yields documents (strings).


def embedded_corpus(meter: Meter | None = None, workers: int | None = None) -> Iterator[str]:
    """English prose that exists on any machine with Python and no network (~1.2M GPT-2 tokens on 3.11).

    The interpreter's help topics (pydoc_data, ~140K tokens), then every docstring and every comment block
    of two or more lines in the standard library's sources, in sorted file order, read by `workers`
    processes (default: one per core; trainer/embedded.py). It varies a little between Python versions, so
    meta.json records the version and a hash of the tokens.
    """
    meter = meter or Meter()
    topics, paths = embedded.topics(), embedded.stdlib_files()
    meter.total = sum(map(len, topics)) + sum(p.stat().st_size for p in paths)
    for text in topics:
        meter.done += len(text)
        yield text
    for size, documents in embedded.read(paths, workers):
        meter.done += size
        yield from documents


def file_corpus(paths: Iterable[str], text_field: str = "text", meter: Meter | None = None) -> Iterator[str]:
    """Documents from .txt (one per file), .jsonl (one per line) and .parquet (one per row) files or dirs."""
    meter = meter or Meter()
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
    sizes = [f.stat().st_size for f in files]
    meter.total = sum(sizes)
    for f, size in zip(files, sizes):
        start = meter.done
        if f.suffix == ".parquet":
            yield from parquet_documents(f, text_field, meter)
        elif f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    meter.done = min(start + size, meter.done + len(line))  # characters: bytes, near enough
                    if line.strip():
                        try:
                            yield json.loads(line)[text_field]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise SystemExit(
                                f"error: {f}:{n} is not a JSON object with a {text_field!r} field "
                                "(choose the field with --text-field)"
                            ) from None
        else:
            meter.done = start + size
            yield f.read_text(encoding="utf-8", errors="replace")
        meter.done = start + size


def parquet_documents(path: Path, text_field: str = "text", meter: Meter | None = None) -> Iterator[str]:
    """Rows of a Parquet file's text column, read a row group at a time (FineWeb files are ~2 GB). `meter`
    advances by the file's size in proportion to the rows read."""
    import pyarrow.parquet as pq

    meter = meter or Meter()
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise SystemExit(f"error: {path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    per_row = Path(path).stat().st_size / max(1, pf.metadata.num_rows)
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        meter.done += batch.num_rows * per_row
        yield from (t for t in batch.column(0).to_pylist() if t)


def fineweb_corpus(
    sample: str = FINEWEB_SAMPLE, cache_dir: str | None = None, meter: Meter | None = None
) -> Iterator[str]:
    """FineWeb's sample files from the Hugging Face hub, in the hub's file order, downloaded one at a time."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise SystemExit("error: the FineWeb download needs huggingface_hub: pip install 'orch[hub]'") from None
    meter = meter or Meter()
    # The tree listing carries each file's size: the total that progress and its ETA are measured against.
    files = sorted(
        (f.path, f.size)
        for f in HfApi().list_repo_tree(FINEWEB_REPO, path_in_repo=sample, recursive=True, repo_type="dataset")
        if f.path.endswith(".parquet") and getattr(f, "size", None) is not None
    )
    if not files:
        raise SystemExit(f"error: no Parquet files under {sample!r} in {FINEWEB_REPO}")
    meter.total = sum(size for _, size in files)
    for name, size in files:
        local = hf_hub_download(FINEWEB_REPO, name, repo_type="dataset", cache_dir=cache_dir)
        start = meter.done
        yield from parquet_documents(Path(local), meter=meter)
        meter.done = start + size


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


# ---------------------------------------------------------------------------------------------------------
# Progress: a bar on a terminal; in a log or a pipe, a plain line every tenth of the input or LINE_EVERY_S.

LINE_EVERY_S = 30.0
LINE_EVERY_FRACTION = 0.1


class Reporter:
    """What prepare() says while it works, on `stream` (stderr): a rich progress bar when that is a terminal,
    else whole lines (no carriage-return redraws, which a log keeps as one endless line), each with the
    total, the rate and an ETA.

    The fraction done is that of the input read (the source's Meter), or of --max-tokens when that ends the
    preparation sooner; the token total is extrapolated from it ("~"), since it is known only at the end."""

    def __init__(self, meter: Meter, max_tokens: int | None, stream: TextIO, bar: bool | None = None):
        self.meter, self.max_tokens, self.stream = meter, max_tokens, stream
        self.t0 = self.shown_at = time.monotonic()
        self.shown = 0  # the steps of LINE_EVERY_FRACTION done at the last plain line
        self.docs = self.tokens = 0
        self.bar = None
        if stream.isatty() if bar is None else bar:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("tokenising"),
                BarColumn(),
                TextColumn("{task.description}"),
                console=Console(file=stream),
                transient=True,  # the summary line replaces it
            )
            self.task = self.bar.add_task("", total=None)
            self.bar.start()

    def fraction(self) -> float | None:
        known = [self.meter.done / self.meter.total] if self.meter.total else []
        if self.max_tokens:
            known.append(self.tokens / self.max_tokens)
        return min(1.0, max(known)) if known else None

    def text(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = f"{_count(self.tokens / elapsed if elapsed > 0 else 0)} tokens/s"
        f = self.fraction()
        if not f:
            return f"tokenised {_count(self.tokens)} tokens ({self.docs:,} documents), {rate}"
        if self.max_tokens and self.tokens / self.max_tokens >= f:
            total, of = _count(self.max_tokens), "of --max-tokens"
        else:
            total = "~" + _count(self.tokens / f)
            size = self.meter.total or 0
            of = f"of {_size(size)} read" if self.meter.unit == "bytes" else f"of {size:,.0f} {self.meter.unit}"
        return (
            f"tokenised {_count(self.tokens)}/{total} tokens ({f:.0%} {of}), {rate}, "
            f"ETA {duration(elapsed * (1 - f) / f)}"
        )

    def update(self, docs: int, tokens: int) -> None:
        self.docs, self.tokens = docs, tokens
        f = self.fraction()
        if self.bar is not None:
            self.bar.update(self.task, total=1.0 if f is not None else None, completed=f or 0, description=self.text())
            return
        now = time.monotonic()
        if f == 1.0:
            return  # the summary line says it
        steps = int(f / LINE_EVERY_FRACTION + 1e-9) if f is not None else 0  # 3/10 is not 0.1 + 0.2 in floats
        if steps > self.shown or now - self.shown_at >= LINE_EVERY_S:
            print(self.text(), file=self.stream, flush=True)
            self.shown_at, self.shown = now, steps

    def close(self, finished: bool) -> None:
        if self.bar is not None:
            self.bar.stop()
        if finished:
            elapsed = time.monotonic() - self.t0
            print(
                f"tokenised {self.tokens:,} tokens ({self.docs:,} documents) in {duration(elapsed)}, "
                f"{_count(self.tokens / elapsed if elapsed > 0 else 0)} tokens/s",
                file=self.stream,
                flush=True,
            )


def _count(n: float) -> str:
    """1,234 → "1.2k", 4,800,000 → "4.8M"."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"


def _size(n: float) -> str:
    for div, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n:.0f} B"


def prepare(
    documents: Iterable[str],
    out: str | Path,
    *,
    source: str,
    command: str,
    val_fraction: float,
    dataset: str | None = None,
    test_fraction: float,
    shard_tokens: int = 100_000_000,
    max_tokens: int | None = None,
    batch_docs: int = 256,
    progress: bool = True,
    meter: Meter | None = None,
    stream: TextIO | None = None,
) -> dict:
    """Tokenise `documents` into shards under `out` and write meta.json. With `progress`, report on `stream`
    (default stderr: a bar on a terminal, plain lines in a log) how far through its input `meter` (the
    source's) says it is; a list of documents without a meter is measured in documents."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten at the end
    for old in out.glob("*.bin"):
        old.unlink()
    enc = gpt2()
    writers = {s: ShardWriter(out, s, shard_tokens) for s in SPLITS}
    digest = hashlib.sha256()
    docs = tokens = 0
    count_docs = meter is None and isinstance(documents, Sized)
    if meter is None:
        meter = Meter(total=len(documents), unit="documents") if isinstance(documents, Sized) else Meter()
    reporter = Reporter(meter, max_tokens, stream or sys.stderr) if progress else None

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for doc in documents:
            batch.append(doc)
            if len(batch) == batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch

    finished = False
    try:
        for batch in batches():
            for text, ids in zip(batch, enc.encode_ordinary_batch(batch, num_threads=4)):
                ids = [EOT] + ids
                writers[split_of(text, val_fraction, test_fraction)].add(ids)
                digest.update(np.asarray(ids, dtype=np.uint16).tobytes())
                docs += 1
                tokens += len(ids)
            if count_docs:
                meter.done = docs
            if reporter is not None:
                reporter.update(docs, tokens)
            if max_tokens is not None and tokens >= max_tokens:
                break
        finished = True
    finally:
        if reporter is not None:
            reporter.close(finished)
    for w in writers.values():
        w.flush()
    empty = [s for s, w in writers.items() if w.total == 0]
    if empty:
        raise SystemExit(f"error: split(s) {', '.join(empty)} got no documents: use more input or larger fractions")
    meta = {
        "source": source,
        "dataset": dataset or source,  # what data.dataset is checked against (trainer/data.py)
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
    parser.add_argument(
        "--workers", type=int, default=None, help="processes parsing the embedded corpus (default: one per core)"
    )
    parser.add_argument(
        "--dataset",
        help="the name meta.json gives the data, which a config's data.dataset must match "
        "(default: HuggingFaceFW/fineweb/SAMPLE for fineweb, else the source)",
    )
    args = parser.parse_args(argv)
    # The small embedded corpus needs larger held-out shares to fill the tiny preset's evaluation slices.
    small = args.source == "embedded"
    val = args.val_fraction if args.val_fraction is not None else (0.02 if small else 0.005)
    test = args.test_fraction if args.test_fraction is not None else (0.05 if small else 0.005)
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        parser.error("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
    if args.source == "files" and not args.inputs:
        parser.error("'files' needs at least one input file or directory")
    meter = Meter()
    if args.source == "embedded":
        docs = embedded_corpus(meter=meter, workers=args.workers)
    elif args.source == "files":
        docs = file_corpus(args.inputs, args.text_field, meter=meter)
    else:
        docs = fineweb_corpus(args.sample, meter=meter)
    command = shlex.join(["python", "-m", "trainer.prepare", *argv])
    meta = prepare(
        docs,
        args.out,
        source=args.source,
        dataset=args.dataset or (f"{FINEWEB_REPO}/{args.sample}" if args.source == "fineweb" else None),
        command=command,
        val_fraction=val,
        test_fraction=test,
        shard_tokens=args.shard_tokens,
        max_tokens=args.max_tokens,
        meter=meter,
    )
    print(f"wrote {args.out}: " + ", ".join(f"{s} {n:,} tokens" for s, n in meta["tokens"].items()))


if __name__ == "__main__":
    main()
