"""The token shards on disk, as training meets them: finding a folder's train and val shards,
refusing a folder fineweb.py has not finished, the header and token-id checks, and the
fingerprint every process compares before the first step (chapter 4 of gpt2.py calls them).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from plumbing import UserError
from fineweb import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, check_finished, shard_digests
from parallel import all_reduce_sum

if TYPE_CHECKING:  # annotations only: gpt2.py imports this file, never the other way
    from gpt2 import Runtime, ShardedDataLoader


def find_shards(data_dir, split: str) -> list[Path]:
    """Shards of one split ("train" or "val") in data_dir, in name order."""
    return sorted(p for p in Path(data_dir).glob("*.bin") if split in p.name)


def data_files(data_dir) -> tuple[list[Path], list[Path]]:
    """The train and val shards of a folder fineweb.py finished (one it is still writing is
    refused), in name order."""
    check_finished(data_dir)
    train_files, val_files = find_shards(data_dir, "train"), find_shards(data_dir, "val")
    if not train_files:
        raise UserError(f"no token shards in {data_dir}: run `python fineweb.py` first "
                        f"(or pass --data_dir)")
    return train_files, val_files


def check_token_ids(tokens: np.ndarray, path, vocab_size: int | None):
    """Every id must be one of the vocabulary's: a larger one would index the padding rows of
    the embedding (garbage) or past its end (an IndexError, a device-side assert on a GPU)."""
    top = int(tokens.max()) if vocab_size and len(tokens) else 0
    if top >= (vocab_size or 1):
        raise UserError(f"{path}: token id {top} is not one of GPT-2's {vocab_size} tokens: the "
                        f"shard was not written with GPT-2's tokenizer; rewrite it with fineweb.py")


def data_fingerprint(files) -> str:
    """A digest of the training shards, to tell another fineweb.py output (the same names) from
    this one: of each shard's sha256 as fineweb.py's manifest records it (the whole file's);
    for shards it records none (llm.c's, an older fineweb.py's: the fingerprint their
    checkpoints hold), of the name, size, and first and last 64 KiB."""
    digest, recorded = hashlib.sha256(), {}
    for path in files:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in recorded:
            recorded[folder] = shard_digests(folder)
        if sha256 := recorded[folder].get(os.path.basename(path)):
            digest.update(f"{os.path.basename(path)} sha256 {sha256}".encode())
            continue
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(f"{os.path.basename(path)} {size}".encode() + f.read(1 << 16))
            f.seek(max(0, size - (1 << 16)))
            digest.update(f.read())
    return digest.hexdigest()[:32]


def agree_on_data(loader: ShardedDataLoader, data_dir, runtime: Runtime):
    """Every rank must train on the same shards: a machine with others would draw other
    windows (and another max_steps) without a word. Rank 0's fingerprint is the reference."""
    if not runtime.ddp:
        return
    mine = torch.tensor(list(bytes.fromhex(loader.fingerprint)), dtype=torch.uint8,
                        device=runtime.device)
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    differs = torch.zeros(runtime.world_size, device=runtime.device)
    differs[runtime.rank] = float(not torch.equal(mine, reference))
    all_reduce_sum(differs, runtime)
    if differs.any():
        raise UserError(f"rank(s) {differs.nonzero().flatten().tolist()} see other training "
                        f"shards in {data_dir} than rank 0: every machine needs the same data")


def shard_length(path) -> int:
    """The number of tokens in a shard, after checking its header against the file's size."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC:
        raise UserError(f"{path}: not a token shard (no llm.c header with magic {SHARD_MAGIC}); "
                        f"rewrite it with `python fineweb.py`")
    if header[1] != SHARD_VERSION:
        raise UserError(f"{path}: shard version {header[1]}, expected {SHARD_VERSION}")
    n, size = int(header[2]), path.stat().st_size
    if n < 0 or size != 4 * HEADER_INTS + 2 * n:
        raise UserError(f"{path}: header says {n} tokens ({4 * HEADER_INTS + 2 * n} bytes) but "
                        f"the file has {size} bytes: truncated or corrupt, rewrite it")
    return n
