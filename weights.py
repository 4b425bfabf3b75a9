"""OpenAI's weights on disk: safetensors read and written by hand (no `safetensors` or
`transformers` dependency), the hub's files downloaded once and checked, and the copy of a
state dict into a model with every name and shape checked. gpt2.py's chapter 3 maps the names;
`export` (tools.py) writes the files back out.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from plumbing import UNKNOWN_SIZE_CAP, UserError, atomic_write, cache_dir, download, file_sha256


# safetensors, read and written by hand (no `safetensors` or `transformers` dependency):
#
#     8 bytes        little-endian uint64 N, the length of the header
#     N bytes        JSON: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
#                           "__metadata__": {...}}, padded with spaces
#     the rest       raw little-endian tensor bytes; offsets count from the end of the header
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, memory-mapped (nothing is read until used)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise UserError(f"{path}: truncated safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: malformed safetensors header (a JSON {type(header).__name__}, "
                        f"not an object of tensors)")
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n) if size > 8 + n else None
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            begin, end = info["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in [*shape, begin, end]):
                raise ValueError("shape and offsets must be whole numbers >= 0")
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: malformed safetensors entry {name!r}: {info}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or end > size - 8 - n:
            raise UserError(f"{path}: tensor {name!r} needs bytes {begin}..{end} of "
                            f"{size - 8 - n}: the file is truncated or malformed")
        raw = torch.from_numpy(data[begin:end]) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def write_safetensors(path, tensors: dict[str, torch.Tensor]):
    """Write tensors as a .safetensors file, atomically."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    inv_dtypes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": inv_dtypes[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec asks for 8-byte alignment of the data
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


# The bytes of OpenAI's gpt2 weights (548,105,171 bytes, sha256 as published for
# openai-community/gpt2). The downloader also checks the size and sha256 the hub itself sends
# with each file (X-Linked-Size and X-Linked-Etag).
HUB_WEIGHTS = {"gpt2": (548_105_171,
                        "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707")}


def hub_file(name: str, filename: str, architecture: dict) -> Path:
    """openai-community/<name>/<filename>: from a Hugging Face cache that already holds it (read
    in place, if it passes the checks), else from the hub (HF_ENDPOINT), cached after the first
    time, checked: a download that is not what the name promises (a config.json of another
    `architecture`, weights that do not parse or differ from OpenAI's bytes) is deleted."""
    dest = cache_dir("hub", f"openai-community--{name}", filename)
    if dest.exists():
        return dest
    size, sha256 = HUB_WEIGHTS.get(name, (None, None)) if filename == "model.safetensors" else (None, None)
    theirs = hf_cache_file(name, filename)
    if (theirs is not None and has_bytes(theirs, size, sha256)
            and hub_file_problem(theirs, architecture, f"{theirs} holds as {name} ") is None):
        return theirs  # not ours to move or delete: a failing one is left as it is
    base = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    # a size the hub does not say is capped: gpt2-xl's float32 weights are 6.4 GB, a config 1 KB
    most = 8 * 10**9 if filename == "model.safetensors" else UNKNOWN_SIZE_CAP
    download(f"{base}/openai-community/{name}/resolve/main/{filename}", dest, size=size, sha256=sha256,
             max_size=most, offline="set HF_ENDPOINT, or pass a local folder (--model or --init_from FOLDER)")
    problem = hub_file_problem(dest, architecture, f"{base} serves as {name} ")
    if problem:
        dest.unlink()
        raise UserError(problem)
    return dest


def has_bytes(path: Path, size: int | None, sha256: str | None) -> bool:
    """Whether a file we did not download has the size and sha256 pinned for it, if any (the
    downloader checks its own downloads)."""
    return ((size is None or path.stat().st_size == size)
            and (sha256 is None or file_sha256(path) == sha256))


def hub_file_problem(path: Path, architecture: dict, source: str) -> str | None:
    """What is wrong with the contents of a hub file (None: nothing): a config.json of another
    architecture than OpenAI's (said as `source` + "a model of ..."), weights that do not parse."""
    try:
        if path.name != "config.json":
            read_safetensors(path)  # a file that parses is complete
            return None
        served = config_from_hf(path)
    except UserError as e:
        return str(e)
    if any(served[k] != v for k, v in architecture.items()):
        return (f"{source}a model of {served['n_layer']} layers, {served['n_head']} heads, "
                f"{served['n_embd']} wide; OpenAI's has {architecture['n_layer']}, "
                f"{architecture['n_head']}, {architecture['n_embd']}: a wrong mirror (HF_ENDPOINT)?")
    return None


def hf_cache_file(name: str, filename: str) -> Path | None:
    """The file in the Hugging Face cache (huggingface_hub's layout, where transformers keeps
    what it downloaded: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub) at the
    revision its refs/main names, or None."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))
    for repo in (f"models--openai-community--{name}", f"models--{name}"):  # and the old alias
        try:
            commit = (hub / repo / "refs" / "main").read_text().strip()
        except (OSError, UnicodeDecodeError):
            continue
        path = hub / repo / "snapshots" / commit / filename
        if commit and path.is_file():
            return path
    return None


def pretrained_files(name_or_path: str, architectures: dict[str, dict]) -> tuple[Path, Path]:
    """config.json and model.safetensors of a hub name (one of `architectures`' keys, each
    OpenAI's sizes: downloaded once) or a local folder."""
    if os.path.isdir(name_or_path):
        folder = Path(name_or_path)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).exists():
                raise UserError(f"{folder} has no {name}: expected a folder written by "
                                f"save_pretrained (config.json + model.safetensors)")
        return folder / "config.json", folder / "model.safetensors"
    if name_or_path in architectures:
        return tuple(hub_file(name_or_path, file, architectures[name_or_path])
                     for file in ("config.json", "model.safetensors"))
    raise UserError(f"unknown model {name_or_path!r}: use one of {', '.join(architectures)} "
                    f"or a folder with config.json and model.safetensors")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str):
    """Copy tensors into the model, checking names and shapes (wte may be padded here)."""
    own = model.state_dict()
    del own["lm_head.weight"]  # the same tensor as wte.weight
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, t in state.items():
            target = own[name]
            if name == "transformer.wte.weight":
                target = target[:t.size(0)]  # the real rows of a padded table
            if target.shape != t.shape:
                raise UserError(f"{source}: {name} has shape {tuple(t.shape)}, the model "
                                f"expects {tuple(target.shape)}")
            target.copy_(t)


HF_CONFIG_SIZES = {"n_positions": "block_size", "vocab_size": "vocab_size", "n_layer": "n_layer",
                   "n_head": "n_head", "n_embd": "n_embd"}


def config_from_hf(path) -> dict[str, int]:
    """A config.json's architecture as GPTConfig's sizes, each a whole number above 0 that the
    model can be."""
    try:
        hf = json.loads(Path(path).read_text())
        sizes = {ours: hf[theirs] for theirs, ours in HF_CONFIG_SIZES.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a GPT-2 config.json ({e!r})") from None
    bad = [k for k, v in zip(HF_CONFIG_SIZES, sizes.values())
           if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad or sizes["n_embd"] % sizes["n_head"]:
        raise UserError(f"{path}: not a GPT-2 config.json: " + (
            f"{', '.join(bad)} must be whole numbers above 0" if bad else
            f"n_embd {sizes['n_embd']} is not a multiple of n_head {sizes['n_head']}"))
    return sizes
