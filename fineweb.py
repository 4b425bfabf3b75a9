"""Turn FineWeb-Edu, or your own text, into the token shards that gpt2.py trains on.

    python fineweb.py                          # sample-10BT: ~28 GB download, ~10B tokens
    python fineweb.py --name sample-100BT      # the bigger samples, same pipeline
    python fineweb.py --input a.txt b.jsonl c.parquet --out_dir /tmp/shards   # your files, no network
    python fineweb.py --help                   # every flag, its default and why

It is the first thing to run and the longest, so it is built to finish: stop it at any
moment (Ctrl-C, kill -9, a crash, a full disk), run the same command again, and it carries on
where it stopped and writes the same bytes an uninterrupted run would have written.

The pipeline, in the order the data flows:

1. Download. The hub's tree API (`{HF_ENDPOINT}/api/datasets/HuggingFaceFW/fineweb-edu/tree/
   main/sample/10BT`, paginated with a `Link: <...>; rel="next"` header) lists the parquet
   files with their size and sha256; a name outside that folder, or a list that is not the
   hub's, stops the run before anything is written. Each file is streamed to `<name>.part` in
   the cache folder (one process at a time: an OS lock on `<name>.lock`), resumed with an HTTP
   Range request after a dropped connection, retried with backoff on timeouts, 5xx and a line
   slower than ~1 KB/s for a minute, cut at the expected size (unknown: 1 MB), checked (size,
   sha256), and only then renamed. 401/403/404, a redirect loop, a host that does not resolve
   fail at once, each as one line. The next file downloads in
   the background while this one is tokenized. A file already in the cache is read from there.
   With `--input`, the files are yours and nothing is downloaded; each kind has its reader:
   `.parquet` its `text` column, `.jsonl` one document a line (its `text` field), `.txt` one
   document a file. `--text_field` names another field or column. The text must be UTF-8.
2. Tokenize. The main process reads the documents (a parquet file one row group at a time, so
   memory does not grow with the file) and hands batches of them to a pool of processes,
   one per core. Each worker returns the GPT-2 tokens of its batch, with <|endoftext|>
   (50256) before every document, as one uint16 array.
3. Shard. Results are taken back in input order and cut into shards: shard 0 is validation,
   the rest training, of exactly `--shard_size` tokens each (documents run on across shard
   boundaries; the last shard is shorter): `fineweb_edu_val_000000.bin`,
   `fineweb_edu_train_000001.bin`, ... The token stream depends only on the input, never on
   `--num_proc`, batch sizes or interruptions, so the shards are byte-identical across runs.

The validation split (`--val_size`) is the first tokens of the stream, in shard 0:
- a download: one whole shard, `--shard_size` tokens (100M, ~1% of sample-10BT), as llm.c and
  build-nanogpt do; a download's total is only known at its end, too late for a fraction.
- `--input`: 10% of the tokens, at most one shard. Your files are local, so the run first
  tokenizes them once to count (stopping at 10 x `--shard_size` tokens, past which the split is
  one whole shard anyway). So a small input, even one book in one .txt, gets a training split
  too, cut through a document where need be. The count also reads every file of a small input
  before anything is written: a bad file stops the run with nothing left behind.
The split is decided once and recorded in the manifest, so a restart never recounts.

Shard format (llm.c's, read by gpt2.read_shard): a 1024-byte header of 256 little-endian
int32 `[20240520, 1, number of tokens, 0, ...]`, then the tokens as little-endian uint16.

Restart. `manifest.json` in the output folder records the inputs (your files with their size,
mtime and a digest of their ends: a rerun on a changed one is refused), the parameters, the
size of the validation split and, for each finished shard, its sha256 and where the next shard
starts: (file, document row, tokens to skip in the stream that starts at that document). One
run at a time writes the folder (an OS lock on its `.lock`). A rerun skips to
that position and re-tokenizes at most one batch it had already seen; files before it are
not needed again, which is why a downloaded parquet file is deleted (unless `--keep_parquet`)
once a finished shard lies past it: the disk holds ~20 GB of shards, not 48 GB of both. Only
what the downloader wrote is deleted: a file that was in the cache before is kept. Every file
another run may read (a shard, the manifest, a download) is written to a temporary name and
renamed when complete. The manifest says when the job is done; check_finished(data_dir), for
gpt2.py to call before it trains, refuses an unfinished one and names the command to finish it,
and a finished one whose shard files are not the ones its manifest lists.
(A "row" is a parquet row, a .jsonl line, or 0 for a .txt file.)

Imports: numpy, tiktoken (>= 0.9, for encode_to_numpy), requests, pyarrow, tqdm, and plumbing.py
(the one-line error, atomic writes, locks, the downloader: shared with the other scripts). Not
torch and not gpt2: every tokenizer worker would pay ~220 MB of memory for `import torch`.
"""
import codecs
import collections
import concurrent.futures
import contextlib
import decimal
import fractions
import hashlib
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import urllib.parse
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import tiktoken
from tqdm import tqdm

from plumbing import (UNKNOWN_SIZE_CAP, Parser, UserError, atomic_write, body, cache_dir, download,
                      exclusive_lock, gpt2_tokenizer, hub_base, naming, open_url, os_error_line,
                      size_of, with_retries)

# ---------------------------------------------------------------------------------------
# The shard format: llm.c's, shared with gpt2.py (which holds the reader, gpt2.read_shard).
# ---------------------------------------------------------------------------------------
SHARD_MAGIC = 20240520  # llm.c's magic number for token files
SHARD_VERSION = 1  # version 1: tokens are uint16
HEADER_INTS = 256  # the header is 256 int32 = 1024 bytes, then the tokens
HEADER_BYTES = HEADER_INTS * 4
EOT = 50256  # <|endoftext|>, GPT-2's only special token; it opens every document


# ---------------------------------------------------------------------------------------
# Writing shards.
# ---------------------------------------------------------------------------------------
class TokenIdError(UserError, ValueError):
    """A token id that does not fit the shards' uint16."""


def as_uint16(tokens, where):
    """Return `tokens` (1-D ints) as little-endian uint16; raise TokenIdError naming `where` if
    an id is outside [0, 2**16), because a plain cast would wrap it silently."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        return np.zeros(0, dtype="<u2")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TokenIdError(f"{where}: tokens must be a 1-D sequence of ints, got {arr.dtype} of shape {arr.shape}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= 2**16:
        raise TokenIdError(f"{where}: token id {hi if hi >= 2**16 else lo} does not fit in a uint16 shard")
    return np.ascontiguousarray(arr, dtype="<u2")  # no copy if it already is one


def write_shard(path, tokens):
    """Write `tokens` (a 1-D array-like of ints, each in [0, 2**16)) as a shard at `path`.

    The file is llm.c's format: 256 little-endian int32 `[SHARD_MAGIC, SHARD_VERSION,
    len(tokens), 0, ...]`, then the tokens as little-endian uint16. It is written atomically
    (`path.tmp`, fsync, rename). Raises ValueError naming the file if an id does not fit."""
    tokens = as_uint16(tokens, path)
    with atomic_write(path) as f:
        f.write(shard_header(len(tokens)))
        f.write(memoryview(tokens))


def shard_header(n):
    """The 1024 bytes that open a shard of `n` tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [SHARD_MAGIC, SHARD_VERSION, n]
    return header.tobytes()


def shard_name(index):
    split = "val" if index == 0 else "train"
    return f"fineweb_edu_{split}_{index:06d}.bin"


# ---------------------------------------------------------------------------------------
# FineWeb-Edu on the Hugging Face hub: its file list, and its files.
# ---------------------------------------------------------------------------------------
REPO = "HuggingFaceFW/fineweb-edu"
SAMPLES = {"sample-10BT": "sample/10BT", "sample-100BT": "sample/100BT", "sample-350BT": "sample/350BT"}
CHECK_FLAGS = " (check --name and HF_ENDPOINT)"
OFFLINE = "set HF_ENDPOINT, or tokenize local files with --input"


def list_files(name, max_files):
    """The parquet files of a FineWeb-Edu sample, sorted, as {"name", "size", "sha256"}.

    Asks the hub's tree API, as huggingface_hub's HfApi.list_repo_tree does, and follows its
    pagination. "name" is the path in the repository; sha256 is the LFS oid, when there is one.
    A list that is not the hub's (a page that is not a JSON list of entries with a path, a file
    without a size, a page that leads back to one already read) is one UserError, and so is one
    that names a path outside the sample's folder: each name is joined to the cache folder."""
    url = f"{hub_base()}/api/datasets/{REPO}/tree/main/{SAMPLES[name]}"
    files, read = [], set()
    with requests.Session() as session:
        while url:
            read.add(url)
            page, next_url = with_retries(url, lambda: read_page(session, url, SAMPLES[name]), offline=OFFLINE)
            if next_url in read:
                raise not_the_list(url, f"its next page, {next_url}, was already read: the list would never end")
            files += page
            url = next_url
    files.sort(key=lambda f: f["name"])
    if not files:
        raise UserError(f"{hub_base()}: the hub lists no parquet files for {name}")
    return files[:max_files]


def read_page(session, url, folder):
    """One page of the tree API: its parquet files and the URL of the next page (or None)."""
    with open_url(session, url, hint=CHECK_FLAGS) as r:
        page = b"".join(body(url, r, (16 * UNKNOWN_SIZE_CAP, "for a page of the file list")))  # ~250 B a file
        try:
            entries = json.loads(page)
        except ValueError:
            raise UserError(f"{url}: not the hub's JSON file list (check HF_ENDPOINT)") from None
        next_url = r.links.get("next", {}).get("url")
        return page_files(url, entries, folder), next_url and urllib.parse.urljoin(url, next_url)


def not_the_list(url, problem):
    return UserError(f"{url}: not the hub's file list ({problem}); check HF_ENDPOINT")


def page_files(url, entries, folder):
    """The parquet files among one page's entries, as {"name", "size", "sha256"}, each checked."""
    if not isinstance(entries, list):
        raise not_the_list(url, f"{JSON_TYPES[type(entries)]}, not a list")
    files = []
    for number, entry in enumerate(entries, 1):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
            raise not_the_list(url, f"entry {number} is not an object with a 'path'")
        lfs = entry.get("lfs")
        file = {"name": entry["path"], "size": entry.get("size"),
                "sha256": lfs.get("oid") if isinstance(lfs, dict) else lfs}
        wanted = entry.get("type") == "file" and file["name"].endswith(".parquet")
        problem = hub_file_problem(file, folder) if wanted else path_problem(file["name"], folder)
        if problem:
            raise not_the_list(url, f"entry {number}: {problem}")
        if wanted:
            files.append(file)
    return files


def path_problem(name, folder):
    """Why `name` is not a plain relative path inside `folder` (POSIX, as the hub writes them),
    which joined to the cache folder stays in it on every OS; None if it is."""
    plain = (name.startswith(folder + "/") and not re.search(r"[\\:\x00-\x1f\x7f]", name)
             and all(part not in ("", ".", "..") for part in name.split("/")))
    return None if plain else (f"'{name}' is not a plain path in {folder}/: nothing absolute, no '.' or '..', "
                               "no backslash or drive letter")


def hub_file_problem(file, folder):
    """What is wrong with {"name", "size", "sha256"} as one of the parquet files of the sample in
    `folder`, or None."""
    name, size, sha256 = file.get("name"), file.get("size"), file.get("sha256")
    if not (isinstance(name, str) and name.endswith(".parquet")):
        return f"{name!r} is not the name of a parquet file"
    if type(size) is not int or size < 0:
        return f"'{name}' has no size in bytes"
    if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
        return f"'{name}' has an LFS oid that is not a sha256"
    return path_problem(name, folder)


def download_hub_file(file, dest):
    """Download one file of the list to `dest`, checked against the size and sha256 the hub lists."""
    return download(f"{hub_base()}/datasets/{REPO}/resolve/main/{file['name']}", dest,
                    size=file["size"], sha256=file["sha256"], desc=file["name"], offline=OFFLINE)


def in_background(fn, *args):
    """Start fn(*args) in a daemon thread and return a Future of its result. Daemon, unlike a
    ThreadPoolExecutor's threads, so that Ctrl-C or an error never waits for a download."""
    future = concurrent.futures.Future()

    def run():
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to whoever waits for the result
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


# ---------------------------------------------------------------------------------------
# Read the input files (parquet, JSON lines, plain text) and tokenize them in a pool of processes.
# ---------------------------------------------------------------------------------------
def open_parquet(path, field):
    """Open a parquet file and check it has a string column `field`; one-line errors otherwise."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise UserError(f"{path}: no '{field}' column (it has: {', '.join(schema.names)}); "
                        "--text_field names the column that holds the text")
    kind = schema.field(field).type
    if not is_strings(kind.value_type if pa.types.is_dictionary(kind) else kind):  # to_pylist decodes those
        raise UserError(f"{path}: the '{field}' column holds {kind}, not strings")
    return pf


def is_strings(kind):
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or \
        getattr(pa.types, "is_string_view", lambda _: False)(kind)


def read_parquet(path, start_row, docs_per_batch, field):
    """Yield (row, texts): the documents of one parquet file from `start_row` on, in batches.

    One row group of the `field` column is in memory at a time, whatever the file's size
    (datatrove, which wrote FineWeb-Edu, puts 1,000 documents in a row group)."""
    pf = open_parquet(path, field)
    if pf.metadata.num_rows == 0:
        raise UserError(f"{path}: no documents (0 rows)")
    first = 0  # the row where this row group starts
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if first + rows > start_row:
            try:
                texts = pf.read_row_group(group, columns=[field]).column(0)
            except (pa.ArrowException, OSError) as e:
                raise UserError(f"{path}: row group {group} is unreadable ({e})") from None
            if texts.null_count:  # refused, as a .jsonl line whose text is null is
                null = first + texts.to_pylist().index(None)
                raise UserError(f"{path} row {null}: the '{field}' column holds null, not a string")
            for i in range(max(start_row - first, 0), rows, docs_per_batch):
                yield first + i, texts.slice(i, docs_per_batch).to_pylist()
        first += rows


def refuse_binary(data, where, offset):
    """A NUL byte is the mark of a binary file (git's test too), and never of text."""
    nul = data.find(0)
    if nul >= 0:
        raise UserError(f"{where}: a binary file, not text (a NUL byte at byte offset {offset + nul})")


def decode(data, path, offset, line=None):
    """`data` (bytes at `offset` in `path`) as a str, or a UserError saying where it is not text."""
    where = f"{path}" if line is None else f"{path} line {line}"
    refuse_binary(data, where, offset)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: invalid UTF-8 at byte offset {offset + e.start} "
                        f"({data[e.start:e.start + 4]!r}); convert the file to UTF-8") from None


def read_txt(path, start_row, docs_per_batch, field):
    """Yield (0, [the whole file]): a .txt file is one document. `field` has no meaning here."""
    if start_row > 0:
        return
    with naming(path), open(path, "rb") as f:
        data = f.read()
    if not data:
        raise UserError(f"{path}: an empty file, no text")
    bom = 3 if data.startswith(codecs.BOM_UTF8) else 0  # an editor's mark, not text to train on
    yield 0, [decode(data[bom:], path, bom)]


def read_jsonl(path, start_row, docs_per_batch, field):
    """Yield (row, texts): the `field` of each line of a JSON-lines file from line `start_row`
    (0-based) on, in batches. Blank lines are no documents, as most JSON-lines writers agree."""
    batch, row, found = [], 0, False
    with naming(path), open(path, "rb") as f:
        # Its first bytes first, as git does: a binary file is called one, not "invalid UTF-8".
        refuse_binary(f.read(8000), path, 0)
        f.seek(0)
        offset = 0
        for i, line in enumerate(f):  # on b"\n" alone, so line numbers mean what an editor shows
            offset += len(line)
            if i < start_row:
                continue
            text = jsonl_text(line, path, i + 1, offset - len(line), field)
            if text is None:
                continue
            if not batch:
                row = i
            batch.append(text)
            found = True
            if len(batch) == docs_per_batch:
                yield row, batch
                batch = []
    if batch:
        yield row, batch
    elif start_row == 0 and not found:
        raise UserError(f"{path}: no documents (an empty file, or only blank lines)")


JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def jsonl_text(line, path, number, offset, field):
    """The `field` of one JSON line (line `number`, 1-based, at byte `offset`), or None if blank."""
    if offset == 0 and line.startswith(codecs.BOM_UTF8):
        line, offset = line[3:], 3
    text = decode(line, path, offset, number)
    if not text.strip():
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {number}: not JSON ({e.msg}: column {e.colno})") from None
    if not isinstance(document, dict):
        raise UserError(f"{path} line {number}: {JSON_TYPES[type(document)]}, not a JSON object")
    if field not in document:
        raise UserError(f"{path} line {number}: no '{field}' field (it has: {', '.join(document) or 'none'}); "
                        "--text_field names the field that holds the text")
    text = document[field]
    if not isinstance(text, str):
        raise UserError(f"{path} line {number}: the '{field}' field holds {JSON_TYPES[type(text)]}, not a string")
    if b"\\u" in line:  # JSON may escape half a UTF-16 pair ("\ud800"), which no UTF-8 text holds
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"{path} line {number}: the '{field}' field escapes a lone UTF-16 surrogate "
                            f"({text[e.start]!r}), which is not text") from None
    return text


READERS = {".parquet": read_parquet, ".jsonl": read_jsonl, ".txt": read_txt}


def reader(path):
    """The reader for a file, by its name's ending."""
    kind = os.path.splitext(path)[1].lower()
    if kind not in READERS:
        raise UserError(f"{path}: not a file fineweb.py reads; --input takes {', '.join(READERS)} files")
    return READERS[kind]


_encoder = None


def init_worker():
    """Run once in each pool process: load the tokenizer, leave Ctrl-C to the main process
    (which stops the pool; otherwise every worker prints a traceback), and watch the parent."""
    global _encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _encoder = gpt2_tokenizer()


def exit_with_parent(parent):
    """Exit once the main process is gone (kill -9): an orphaned worker would otherwise wait
    for work forever. Gone means this process was adopted by another, on Linux and macOS."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def tokenize(texts, where):
    """The GPT-2 tokens of a batch of documents, <|endoftext|> before each, as one uint16 array."""
    parts = []
    eot = np.array([EOT], dtype=np.uint32)
    for text in texts:
        parts.append(eot)
        # encode_to_numpy with no special tokens allowed or disallowed is encode_ordinary
        # (any "<|endoftext|>" in the text is plain text), minus the Python list of ints.
        parts.append(_encoder.encode_to_numpy(text, disallowed_special=()))
    return as_uint16(np.concatenate(parts), where)


def count_tokens(texts, where):
    """How many tokens tokenize() makes of a batch: all a count needs to carry back."""
    return len(tokenize(texts, where))


def tokenize_in_order(pool, batches, window, task=tokenize):
    """For each (position, where, texts) in `batches`, yield (position, task(texts, where)) in
    input order, with at most `window` batches in the pool, so memory stays bounded. (Pool.imap
    would read `batches` from a thread of its own, as far ahead as it likes; we keep it here.)"""
    pending = collections.deque()
    try:
        for position, where, texts in batches:
            pending.append((position, pool.submit(task, texts, where)))
            if len(pending) >= window:
                position, result = pending.popleft()
                yield position, result.result()
        for position, result in pending:
            yield position, result.result()
    except BrokenProcessPool:  # where multiprocessing.Pool would wait forever
        raise UserError("a tokenizer process died (killed for lack of memory?); "
                        "rerun to continue, with a lower --num_proc if it happens again") from None


# ---------------------------------------------------------------------------------------
# Shards and the manifest that makes a run restartable.
# ---------------------------------------------------------------------------------------
MANIFEST = "manifest.json"


def save_manifest(out_dir, manifest):
    with atomic_write(os.path.join(out_dir, MANIFEST)) as f:
        f.write(json.dumps(manifest, indent=1).encode())


def next_start(manifest):
    """Where the next shard starts: [file, row, tokens of that row's stream to skip]."""
    return manifest["shards"][-1]["next"] if manifest["shards"] else [0, 0, 0]


class ShardWriter:
    """Cuts the token stream into shards: the validation split (`val_tokens`), then shards of
    exactly `shard_size` tokens, recording each in the manifest together with where the next
    one starts: (file, row, tokens to skip)."""

    def __init__(self, out_dir, shard_size, manifest):
        self.out_dir, self.manifest = out_dir, manifest
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0

    def size(self):
        """The size of the shard being filled: shard 0 holds the validation split."""
        if self.manifest["shards"]:
            return len(self.buffer)
        return self.manifest["val_tokens"]

    def add(self, file, row, skipped, tokens):
        """Add the tokens of the documents from (file, row) on, whose first `skipped` tokens
        are already in an earlier shard."""
        done = 0
        while done < len(tokens):
            n = min(self.size() - self.fill, len(tokens) - done)
            self.buffer[self.fill:self.fill + n] = tokens[done:done + n]
            self.fill, done = self.fill + n, done + n
            if self.fill == self.size():
                self.write([file, row, skipped + done])

    def finish(self, end):
        if self.fill:
            self.write(end)  # the last shard, shorter than the others
        self.manifest["done"] = True
        save_manifest(self.out_dir, self.manifest)

    def write(self, next_start):
        name = shard_name(len(self.manifest["shards"]))
        tokens = self.buffer[:self.fill]
        write_shard(os.path.join(self.out_dir, name), tokens)
        # the whole file's sha256, for gpt2.py's fingerprint of the data (what a resume compares)
        digest = hashlib.sha256(shard_header(len(tokens)))
        digest.update(memoryview(as_uint16(tokens, name)))
        self.manifest["shards"].append({"name": name, "tokens": self.fill, "sha256": digest.hexdigest(),
                                        "docs": int(np.count_nonzero(tokens == EOT)), "next": next_start})
        save_manifest(self.out_dir, self.manifest)  # after the shard: a listed shard is complete
        tqdm.write(f"wrote {name} ({self.fill:,} tokens)")
        self.fill = 0


DEFAULT_VAL_SIZE = "10%"  # of an --input's tokens, at most one shard; nanoGPT's Shakespeare split


def val_size(args):
    """The --val_size this run asks for: given, or the default for its source; None for a
    download's default (one whole shard), which its params leave out."""
    return args.val_size or (DEFAULT_VAL_SIZE if args.input else None)


def run_params(args):
    """What decides the shards' bytes; a rerun must match them to continue a job."""
    if args.input:
        source = {"input": [os.path.abspath(p) for p in args.input], "text_field": args.text_field}
    else:
        source = {"name": args.name, "max_files": args.max_files}
    params = {"source": source, "shard_size": args.shard_size}
    if val_size(args):
        params["val_size"] = val_size(args)
    return params


def read_manifest(out_dir):
    """The manifest in `out_dir`, None if there is none. One that is not as this file writes
    them (cut short, edited, from another program) is one UserError saying what to do."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
        problem = manifest_problem(manifest)
    except ValueError as e:  # not JSON, not UTF-8
        problem = f"not JSON: {e}"
    except OSError as e:
        problem = f"unreadable: {e.strerror}"
    if problem:
        raise UserError(f"{path}: not a manifest fineweb.py can continue from ({problem}); move it away, "
                        f"or delete {out_dir} to start over")
    return manifest


MANIFEST_FIELDS = {"params": dict, "files": list, "val_tokens": int, "shards": list, "done": bool}
SHARD_FIELDS = {"name": str, "tokens": int, "docs": int, "next": list}


def missing_field(value, fields, what):
    """Which of `fields` ({name: type}) `value` (parsed JSON) lacks or holds another type of, as
    a phrase; None if none."""
    if not isinstance(value, dict):
        return f"{what} is {JSON_TYPES.get(type(value), 'not an object')}, not an object"
    for name, kind in fields.items():
        if not isinstance(value.get(name), kind):
            return f"{what} has no {kind.__name__} '{name}'"
    return None


def manifest_problem(manifest):
    """What makes `manifest` (parsed JSON) not one this file writes, or None. Every name in it
    is joined to a folder, so it must be the one this file would have written."""
    if problem := missing_field(manifest, MANIFEST_FIELDS, "it"):
        return problem
    source = manifest["params"].get("source")
    if not (isinstance(source, dict) and (isinstance(source.get("input"), list) or source.get("name") in SAMPLES)):
        return "its params name no source: no --input files, no --name"
    for i, shard in enumerate(manifest["shards"]):
        problem = missing_field(shard, SHARD_FIELDS, f"shard {i}")
        if problem:
            return problem
        if shard["name"] != shard_name(i):
            return f"shard {i} is called '{shard['name']}', not {shard_name(i)}"
        if len(shard["next"]) != 3 or not all(type(n) is int for n in shard["next"]):
            return f"shard {i}'s 'next' is not 3 numbers"
        if "sha256" in shard and not (isinstance(shard["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}",
                                                                                       shard["sha256"])):
            return f"shard {i}'s 'sha256' is not a sha256"
    folder = SAMPLES.get(source.get("name"))
    for i, file in enumerate(manifest["files"]):
        if problem := file_problem(file, folder):
            return f"input file {i}: {problem}"
    return None


def file_problem(file, folder):
    """What is wrong with a manifest's entry for an input file: one of the user's, {"path"}, or
    (`folder` being the sample's) one of the hub's."""
    if not isinstance(file, dict):
        return "not an object"
    if isinstance(file.get("path"), str):
        return None
    return hub_file_problem(file, folder) if folder else "no path"


def check_finished(data_dir):
    """Raise UserError if `data_dir` holds a job fineweb.py has not finished, naming the command
    that finishes it; return None if its manifest says it is done, or if it has none (shards
    from llm.c or elsewhere). For gpt2.py, before it trains on the folder: a job stopped half
    way would give it a fraction of the data, and no sign of it."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        return
    if manifest["done"]:
        if problem := shards_problem(data_dir, manifest):
            raise UserError(f"{data_dir}: {problem}; `{rerun_command(data_dir, manifest)}` makes the listed "
                            "shards again, a file it did not write is yours to move away")
        return
    shards, files = len(manifest["shards"]), len(manifest["files"])
    raise UserError(f"{data_dir} is not finished: fineweb.py wrote {shards} shard{'' if shards == 1 else 's'} and "
                    f"stopped in file {min(next_start(manifest)[0] + 1, files)} of its {files} input files; rerun "
                    f"the same command to finish it: `{rerun_command(data_dir, manifest)}`")


def shards_problem(data_dir, manifest):
    """How the shard files in `data_dir` differ from the manifest's list (names, token counts),
    or None: a shard deleted, cut short, or one more dropped in, would be trained on (or not)
    without a word."""
    listed = {shard["name"]: shard["tokens"] for shard in manifest["shards"]}
    for name, tokens in listed.items():
        size = size_of(os.path.join(data_dir, name))
        if not size:
            return f"{name} is missing"
        if size != HEADER_BYTES + 2 * tokens:
            return f"{name} holds {(size - HEADER_BYTES) / 2:,g} tokens, the manifest lists {tokens:,}"
    stray = sorted(set(f for f in os.listdir(data_dir) if f.endswith(".bin")) - set(listed))
    if stray:
        return f"{stray[0]} is not one fineweb.py listed in {MANIFEST}"
    return None


def shard_digests(data_dir):
    """{shard name: sha256 of the whole file} that fineweb.py's manifest in `data_dir` records
    (older manifests record none; folders from elsewhere have no manifest)."""
    manifest = read_manifest(data_dir)
    return {s["name"]: s["sha256"] for s in manifest["shards"] if "sha256" in s} if manifest else {}


def rerun_command(out_dir, manifest):
    """The command that continues the job in `out_dir`: the flags that decide its shards (the
    manifest's params) where they are not the default, and the cache its downloads went to."""
    params, default = manifest["params"], parse_args([])
    source, words = params["source"], []
    if "input" in source:
        words += ["--input", *source["input"]]
        if source.get("text_field", default.text_field) != default.text_field:
            words += ["--text_field", source["text_field"]]
    else:
        if source.get("name", default.name) != default.name:
            words += ["--name", source["name"]]
        if source.get("max_files"):
            words += ["--max_files", str(source["max_files"])]
    if params.get("shard_size", default.shard_size) != default.shard_size:
        words += ["--shard_size", str(params["shard_size"])]
    if params.get("val_size") not in (None, DEFAULT_VAL_SIZE if "input" in source else None):
        words += ["--val_size", params["val_size"]]
    words += ["--out_dir", os.fspath(out_dir)]
    if manifest.get("cache_dir") not in (None, os.path.abspath(default.cache_dir)):
        words += ["--cache_dir", manifest["cache_dir"]]
    return f"python fineweb.py {shlex.join(map(str, words))}"


def load_manifest(args):
    """The manifest of `--out_dir`, checked against this run's parameters; None for a new job."""
    manifest = read_manifest(args.out_dir)
    if manifest is not None:
        params = run_params(args)
        if manifest["params"] != params:
            raise UserError(f"{args.out_dir} holds shards made with {json.dumps(manifest['params'])}, not "
                            f"{json.dumps(params)}; pick another --out_dir, or delete that one to start over")
        drop_damaged_shards(args.out_dir, manifest)
        if not manifest["done"]:
            check_inputs_unchanged(args.out_dir, manifest)
        return manifest
    if os.path.isdir(args.out_dir) and any(f.startswith("fineweb_edu_") and f.endswith(".bin")
                                           for f in os.listdir(args.out_dir)):
        raise UserError(f"{args.out_dir} holds shards but no {MANIFEST}, so they are not ours to continue; "
                        "pick another --out_dir, or empty that one")
    for p in args.input or []:  # before the tokenizer processes start: a typo is answered at once
        if os.path.isdir(p):
            raise UserError(f"{p}: a folder, not a file (--input takes files: {os.path.join(p, '*.parquet')}, say)")
        if not os.path.isfile(p):
            raise UserError(f"{p}: no such file (--input)")
        reader(p)
    return None


def stamp(path, ends=1 << 16):
    """What tells a changed input file: its size, mtime and the sha256 of its first and last
    64 KiB (a cheap look at the bytes; the mtime sees an edit in the middle)."""
    with naming(path), open(path, "rb") as f:
        info = os.fstat(f.fileno())
        digest = hashlib.sha256(f.read(ends))
        f.seek(max(0, info.st_size - ends))
        digest.update(f.read(ends))
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "head_tail_sha256": digest.hexdigest()}


def check_inputs_unchanged(out_dir, manifest):
    """A job continues only on the inputs it started on: one changed meanwhile (a .jsonl's lines
    shuffled, say) would put documents of its validation split into training, or twice."""
    for file in manifest["files"]:
        recorded = {key: file[key] for key in ("size", "mtime_ns", "head_tail_sha256") if key in file}
        if "path" not in file or not recorded:
            continue  # a download (checked by its sha256), or a manifest of an older fineweb.py
        now = stamp(file["path"]) if os.path.isfile(file["path"]) else {}
        if {key: now.get(key) for key in recorded} != recorded:
            raise UserError(f"{file['path']} changed since this job started (its size, time or bytes): its "
                            f"shards would mix two versions of it; put it back, or delete {out_dir} to start over")


def start_manifest(args, pool):
    """Start a job: list the input files, decide the validation split, then save the manifest.
    Nothing is written before the split is decided, so an input that fails while it is counted
    leaves nothing behind, and the rerun may change any flag."""
    params = run_params(args)
    files = [{"path": p, **stamp(p)} for p in params["source"]["input"]] if args.input else \
        list_files(args.name, args.max_files)
    manifest = {"params": params, "files": files, "val_tokens": val_tokens(args, files, pool),
                "shards": [], "done": False}
    os.makedirs(args.out_dir, exist_ok=True)
    save_manifest(args.out_dir, manifest)
    return manifest


def val_tokens(args, files, pool):
    """The size of the validation split, from --val_size: a number of tokens, or a percentage of
    the input's tokens (at most one shard), which needs them counted first."""
    size = val_size(args)
    if size is None:
        return args.shard_size
    if not size.endswith("%"):
        if not args.input:
            return int(size)  # a download, not counted: too big to read twice
        total = count_input(args, files, pool, enough=int(size) + 1)
        wanted = int(size)
    else:
        fraction = fractions.Fraction(size[:-1]) / 100  # exact: the split must not depend on rounding
        total = count_input(args, files, pool, enough=math.ceil(args.shard_size / fraction))
        wanted = min(math.ceil(total * fraction), args.shard_size, total - 1)
    if not 0 < wanted < total:
        raise UserError(f"the input holds {total:,} tokens: too few for a validation split of {size} "
                        "and a training split")
    return wanted
def count_input(args, files, pool, enough):
    """The tokens of the input files, counted until there are `enough`: past that, more do not
    change the split."""
    inputs = Inputs(files, args.cache_dir, keep_parquet=True, text_field=args.text_field)
    batches = inputs.documents([0, 0, 0], args.docs_per_batch)
    total = 0
    with tqdm(unit="tok", unit_scale=True, desc="counting", disable=None) as bar:
        for _, tokens in tokenize_in_order(pool, batches, window=2 * args.num_proc, task=count_tokens):
            total += tokens
            bar.update(tokens)
            if total >= enough:
                break
    return total


def drop_damaged_shards(out_dir, manifest):
    """Forget the listed shards from the first one that is missing or has the wrong size on:
    the run makes them again, from where the last good one ends."""
    for i, shard in enumerate(manifest["shards"]):
        if size_of(os.path.join(out_dir, shard["name"])) != HEADER_BYTES + 2 * shard["tokens"]:
            tqdm.write(f"{shard['name']} is missing or damaged: making it and those after it again")
            del manifest["shards"][i:]
            manifest["done"] = False
            return


def report(args, manifest, tokens_this_run, seconds):
    shards = manifest["shards"]
    tokens, docs = sum(s["tokens"] for s in shards), sum(s["docs"] for s in shards)
    print(f"{args.out_dir}: {docs:,} documents, {tokens:,} tokens in {len(shards)} shards "
          f"({len(shards) * HEADER_BYTES + 2 * tokens:,} bytes)")
    if shards:
        val = shards[0]["tokens"]
        print(f"validation: {val:,} tokens ({val / tokens:.1%}) in {shards[0]['name']}; "
              f"training: {tokens - val:,} tokens in {len(shards) - 1} shard{'' if len(shards) == 2 else 's'}")
    if tokens_this_run:
        print(f"this run: {tokens_this_run:,} tokens in {seconds:.1f} s = {tokens_this_run / seconds:,.0f} tokens/s "
              f"with {args.num_proc} tokenizer processes")


# ---------------------------------------------------------------------------------------
# The run: download -> tokenize -> shard, from where the last run stopped.
# ---------------------------------------------------------------------------------------
class Inputs:
    """The input files: where each one is on disk, fetching it if it comes from the hub. A
    download is deleted once no shard needs it, but only one the downloader wrote: a file that
    was in the cache before the job wanted it (the user's copy of the dataset, one a
    --keep_parquet job kept) is read where it is, and kept."""

    def __init__(self, files, cache_dir, keep_parquet, text_field, on_claim=lambda: None):
        self.files, self.cache_dir, self.keep, self.field = files, cache_dir, keep_parquet, text_field
        self.on_claim = on_claim
        self.forgotten = 0  # files before this one are deleted (or kept, with --keep_parquet)

    def local_path(self, i):
        file = self.files[i]
        return file.get("path") or os.path.join(self.cache_dir, file["name"])

    def fetch(self, i):
        return self.local_path(i) if "path" in self.files[i] else download_hub_file(self.files[i], self.local_path(i))

    def claim(self, i):
        """Before file `i` is fetched: if nothing is at its place yet, what will be there is the
        downloader's, so it is marked ours to delete; `on_claim` records that (in the manifest)
        before the download starts, so that a rerun after a crash knows it too."""
        file = self.files[i]
        if "name" in file and not file.get("ours") and not os.path.exists(self.local_path(i)):
            file["ours"] = True
            self.on_claim()

    def start_fetch(self, i):
        self.claim(i)
        return in_background(self.fetch, i)

    def forget_before(self, i):
        """Delete the downloads of the files before `i`: no finished shard needs them again."""
        for j in range(self.forgotten, i):
            if not self.keep and self.files[j].get("ours"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.local_path(j))
        self.forgotten = max(self.forgotten, i)

    def documents(self, start, docs_per_batch):
        """Yield ((file, row), description, texts) from position `start` on, downloading the
        next file in the background while this one is read."""
        upcoming = self.start_fetch(start[0]) if start[0] < len(self.files) else None
        for i in range(start[0], len(self.files)):
            path = upcoming.result()
            if i + 1 < len(self.files):
                upcoming = self.start_fetch(i + 1)
            read = reader(path)
            for row, texts in read(path, start[1] if i == start[0] else 0, docs_per_batch, self.field):
                yield (i, row), f"{path} row {row}", texts


def run(args):
    started = time.time()
    if not hasattr(tiktoken.Encoding, "encode_to_numpy"):
        raise UserError("this tiktoken is too old (no encode_to_numpy): pip install 'tiktoken>=0.9'")
    gpt2_tokenizer()  # here, where a missing tokenizer is one line, not a broken pool
    with holding(args.out_dir):
        manifest = load_manifest(args)
        if manifest and manifest["done"]:
            print(f"nothing to do: {args.out_dir} is complete")
            report(args, manifest, 0, 0)
            return 0
        with concurrent.futures.ProcessPoolExecutor(args.num_proc, initializer=init_worker) as pool:
            # Start the processes now, before the shard buffer and the download thread exist: fork
            # copies only the thread that forks, and a lock held by another would stay locked.
            pool.submit(int).result()
            manifest = manifest or start_manifest(args, pool)
            tokens_this_run = make_shards(args, manifest, pool)
    report(args, manifest, tokens_this_run, time.time() - started)
    return 0


@contextlib.contextmanager
def holding(out_dir):
    """The run holds `out_dir` alone (an OS lock on its .lock file), as gpt2.py holds its log
    folder: two runs at once would each write shards the other's manifest does not list. A run
    that made the folder and wrote nothing into it (an input refused) takes it away again."""
    made = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        with exclusive_lock(os.path.join(out_dir, ".lock"), busy=f"another fineweb.py is writing {out_dir}: "
                            "wait for it to finish, or give this one another --out_dir"):
            yield
    finally:
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only if empty


def make_shards(args, manifest, pool):
    """Tokenize the input from where the manifest says the last run stopped, into shards;
    return how many tokens this run added."""
    start = next_start(manifest)
    if not args.input and manifest.get("cache_dir") != os.path.abspath(args.cache_dir):
        manifest["cache_dir"] = os.path.abspath(args.cache_dir)  # for the command that finishes the job
        save_manifest(args.out_dir, manifest)
    inputs = Inputs(manifest["files"], args.cache_dir, args.keep_parquet, args.text_field,
                    on_claim=lambda: save_manifest(args.out_dir, manifest))
    inputs.forget_before(start[0])
    if manifest["shards"]:
        print(f"resuming after {len(manifest['shards'])} shards, at file {start[0]} row {start[1]}")
    to_skip, tokens_this_run = start[2], 0
    writer = ShardWriter(args.out_dir, args.shard_size, manifest)
    batches = inputs.documents(start, args.docs_per_batch)
    with tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=None) as bar:
        for (file, row), tokens in tokenize_in_order(pool, batches, window=2 * args.num_proc):
            skipped = min(to_skip, len(tokens))  # tokens already in a shard before a restart
            to_skip -= skipped
            writer.add(file, row, skipped, tokens[skipped:])
            inputs.forget_before(next_start(manifest)[0])
            tokens_this_run += len(tokens) - skipped
            bar.update(len(tokens) - skipped)
    writer.finish([len(inputs.files), 0, 0])
    inputs.forget_before(len(inputs.files))
    return tokens_this_run


def default_num_proc():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv=None):
    p = Parser(
        prog="fineweb.py",
        description="Download FineWeb-Edu, or read your own text files, and tokenize them into GPT-2 token "
                    "shards for gpt2.py. "
                    "After any interruption, run the same command again: it continues where it stopped.")
    p.add_argument("--name", default="sample-10BT", choices=sorted(SAMPLES),
                   help="which FineWeb-Edu sample to download (default: %(default)s: ~28 GB of parquet, "
                        "~10B GPT-2 tokens, what GPT-2 124M trains on)")
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="tokenize these local files instead, in this order, without network: .txt (a file "
                        "is one document), .jsonl (a line is one document, its --text_field), .parquet (its "
                        "--text_field column), as UTF-8 (default: download --name from the hub at "
                        "$HF_ENDPOINT, else https://huggingface.co)")
    p.add_argument("--text_field", default="text", metavar="NAME",
                   help="with --input: the field of each .jsonl line, and the column of .parquet files, that "
                        "holds the document's text, e.g. --text_field content for {\"content\": \"...\"} "
                        "(default: %(default)s)")
    p.add_argument("--max_files", type=int, metavar="N",
                   help="download only the first N parquet files, for a quick try (default: all of them)")
    p.add_argument("--out_dir", default=os.path.join("data", "fineweb_edu"),
                   help="where the shards and manifest.json go (default: %(default)s, which is also "
                        "the default --data_dir of gpt2.py)")
    p.add_argument("--cache_dir", default=cache_dir("fineweb"),
                   help="where downloads and their resumable .part files go (default: %(default)s, "
                        "from $XDG_CACHE_HOME or ~/.cache: outside the repository)")
    p.add_argument("--shard_size", type=int, default=100_000_000, metavar="TOKENS",
                   help="tokens per training shard (default: %(default)s, 200 MB files as in llm.c and "
                        "build-nanogpt); also the most the validation shard holds")
    p.add_argument("--val_size", metavar="TOKENS|PERCENT%",
                   help="the validation split, shard 0: the first TOKENS of the token stream, or PERCENT%% of "
                        "its tokens, at most --shard_size (default: for a download, --shard_size tokens, as "
                        f"llm.c does; with --input, {DEFAULT_VAL_SIZE.replace('%', '%%')} of the tokens, "
                        "which are counted first, at most --shard_size: so that a small input, even a "
                        "single document, gets a training split too)")
    p.add_argument("--num_proc", type=int, default=default_num_proc(), metavar="N",
                   help="tokenizer processes (default: %(default)s, every core this process may use); "
                        "the shards do not depend on it")
    p.add_argument("--docs_per_batch", type=int, default=512, metavar="N",
                   help="documents per task handed to a tokenizer process (default: %(default)s, ~0.5 s "
                        "of work, so handing it over costs nothing); the shards do not depend on it")
    p.add_argument("--keep_parquet", action="store_true",
                   help="keep the downloaded parquet files (default: delete each once finished shards hold "
                        "its tokens, so the disk ends with ~20 GB of shards, not 48 GB)")
    args = p.parse_args(argv)
    for flag in ("max_files", "shard_size", "num_proc", "docs_per_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} must be at least 1")
    if args.val_size is not None:
        args.val_size = check_val_size(p, args)
    if args.text_field != "text" and not args.input:
        p.error("--text_field is for --input: FineWeb-Edu's files hold their text in 'text'")
    return args


def check_val_size(p, args):
    """--val_size, checked and written one way (the manifest compares it as a string)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(%?)\s*", args.val_size)
    if not match or (not match[2] and "." in match[1]):
        p.error(f"--val_size {args.val_size}: give a number of tokens (1000000) or a percentage (10%)")
    if match[2]:
        percent = fractions.Fraction(match[1])
        if not 0 < percent < 100:
            p.error("--val_size: a percentage must be above 0% and below 100%")
        if not args.input:
            p.error("--val_size: a percentage needs --input (a download's total is unknown until its end)")
        return f"{decimal.Decimal(match[1]).normalize():f}%"  # 10.0% is 10%, to the manifest too
    if not 1 <= int(match[1]) <= args.shard_size:
        p.error(f"--val_size: a number of tokens must be from 1 to --shard_size ({args.shard_size})")
    return str(int(match[1]))


def main(argv=None):
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    except UserError as e:
        message = str(e)
    except OSError as e:  # a full disk, a folder we may not write to, ...
        message = os_error_line(e) + ("; fix that and rerun to continue" if e.filename else "")
    print(f"error: {message}".replace("\n", " "), file=sys.stderr)
    return 1


if __name__ == "__main__":  # needed where processes start by importing this file (macOS, Windows)
    sys.exit(main())
