"""GPT-2, from scratch, in one file: the model, its data, and how to train it on 1 to N GPUs.

This file is meant to be read top to bottom, like a short book:

    1. The model        GPTConfig, attention, MLP, Block, GPT; OpenAI's weights in and out;
                        generation with a key/value cache.
    2. The data         llm.c's token-shard format and a sharded, resumable data loader.
    3. Optimization     AdamW parameter groups and the warmup + cosine learning-rate schedule.
    4. Evaluation       validation loss over a fixed token budget, samples, HellaSwag.
    5. Distributed      what torchrun gives us, device and precision choice, reductions.
    6. Checkpoints      a complete training state, written atomically, and exact resume.
    7. Training         the loop, in the order one optimizer step happens.
    8. Tools            `bench`, `plot`, `sample`.
    9. main()           the command line: every hyperparameter, its default and why.

Run it:

    python fineweb.py                                    # token shards in data/fineweb_edu
    python gpt2.py                                       # train on one GPU, or on the CPU
    torchrun --standalone --nproc_per_node=8 gpt2.py     # train on 8 GPUs of one machine
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --master_addr=HOST --master_port=29500 gpt2.py   # ... and node_rank=1 on the second
    python gpt2.py sample --model gpt2 --prompt "Hello, I'm a language model,"
    python gpt2.py --help                                # every flag, with its default's reason

The names of the weights (wte, wpe, h, ln_1, attn.c_attn, ...) are OpenAI's and Hugging Face's,
so every tensor here maps one-to-one onto the paper's figures and onto `transformers`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import struct
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import requests
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# The GPT-2 tokenizer has 50,257 tokens: 256 bytes, 50,000 merges and <|endoftext|>, id 50256.
# Every model here, whatever the size of its embedding table, only ever scores these.
VOCAB_SIZE = 50257
EOT = 50256


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad flag): main() prints it as one line."""


# -----------------------------------------------------------------------------------------------
# 1. The model
#
# GPT-2 (Radford et al., 2019) is a decoder-only transformer: token embeddings (wte) plus learned
# position embeddings (wpe), n_layer identical blocks, a final LayerNorm (ln_f), and a linear
# map back to the vocabulary (lm_head) that shares its weights with wte. Each block is
# "pre-LN", the one change GPT-2 made to GPT-1: LayerNorm comes *before* attention and the MLP,
# inside the residual branch, so the residual stream itself is a clean sum that gradients flow
# through untouched:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)).
#
# The four OpenAI sizes, and small ones that train on a laptop CPU in minutes. Parameter counts
# are with the tied 50,257-token embedding counted once (the 124M figure is exact: a test checks
# it; the small presets' counts are dominated by that embedding, 50257 x n_embd).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "small": dict(n_layer=6, n_head=6, n_embd=384),  # 30M, of which 19M embedding
    "mini": dict(n_layer=4, n_head=4, n_embd=256),  # 16M, of which 13M embedding
    "tiny": dict(n_layer=2, n_head=2, n_embd=128),  # 7M, of which 6.5M embedding
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence; wpe has one row per position
    vocab_size: int = VOCAB_SIZE  # tokens the model scores and samples
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # The embedding table may have more rows than there are tokens: 50304 = 64 * 786 makes the
    # lm_head matmul tile evenly on GPUs (~4% faster in build-nanogpt). The extra rows are never
    # scored, sampled or saved: `logits` are always cut back to vocab_size columns.
    pad_vocab_to_multiple_of: int = 1

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple_of
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
        settings = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        config = cls(**settings)
        if config.n_embd % config.n_head:
            raise UserError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        return config


class KVCache:
    """Keys and values of every layer for the positions seen so far, so that generating one more
    token costs one token's worth of compute instead of re-running the whole prefix.

    Buffers are allocated once for `max_len` positions; `pos` is how many are filled.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        head_size = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's (B, nh, T, hs) keys and values; return all of them so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which position t only sees positions <= t.

    One matmul (c_attn) makes queries, keys and values for all heads at once; the attention
    itself is F.scaled_dot_product_attention, which picks a fused kernel (FlashAttention on
    recent GPUs) that never materializes the (T, T) attention matrix.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True  # see GPT._init_weights

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            # SDPA's causal mask is aligned to the top-left corner, right only when queries and
            # keys start together: so a cached call is either the prompt (pos 0) or one token,
            # which may look at every cached key and needs no mask at all.
            assert cache.pos == 0 or T == 1, "after the prompt, the cache takes one token a step"
            k, v = cache.update(layer, k, v)  # (B, nh, pos + T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back (the paper's 3072 for 768)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # OpenAI's code used the tanh approximation of GELU; we match it to load their weights
        # exactly (transformers calls it "gelu_new").
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, 4C) inside, (B, T, C) out


class Block(nn.Module):
    """One pre-LN transformer block: attention mixes positions, the MLP thinks per position."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `x @ weight.T` against targets, without ever holding all the logits.

    The lesson of this class: at B=8, T=256 the float32 logits are 2048 x 50304 x 4 bytes =
    412 MB, and the plain path makes several such tensors per step (logits, softmax, their
    gradients). On a CPU each one is a fresh mmap from the C allocator, returned to the kernel
    when freed and faulted in again page by page the next step: ~470,000 page faults and ~0.7 s
    of system time per step, measured. Here we walk over `chunk` rows at a time into one reused
    buffer, and compute the gradients right away in the forward pass (the softmax we just made
    *is* most of the gradient: d loss / d logits = softmax - onehot), so backward only scales
    them. Same matmuls, same FLOPs, a few MB instead of ~1.6 GB of temporaries.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int):
        # x: (N, C) final hidden states, weight: (V, C), targets: (N,)
        N = x.size(0)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if needs_grad else None
        grad_w = torch.zeros_like(weight) if needs_grad else None
        buf = x.new_empty(min(chunk, N), weight.size(0))  # (chunk, V), reused for every chunk
        loss_sum = x.new_zeros((), dtype=torch.float64)
        for start in range(0, N, chunk):
            xc, tc = x[start:start + chunk], targets[start:start + chunk]
            logits = torch.mm(xc, weight.t(), out=buf[:len(xc)])  # (n, V)
            lse = torch.logsumexp(logits, dim=1)  # (n,)
            loss_sum += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if needs_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (n, V)
                probs[torch.arange(len(tc)), tc] -= 1  # minus the one-hot target
                torch.mm(probs, weight, out=grad_x[start:start + chunk])  # (n, C)
                grad_w.addmm_(probs.t(), xc)  # (V, C)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.n = N
        return (loss_sum / N).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n
        return grad_x * scale, grad_w * scale, None, None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (Press & Wolf, 2017), as in GPT-2: the matrix that turns a token into a
        # vector also turns the last vector back into token scores. Saves 38.6M parameters at
        # 124M (30% of the model) and helps, since both sides want similar tokens close.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2's initialization: N(0, 0.02) for every matrix, zero biases. The projections that
        # write into the residual stream are scaled by 1/sqrt(2 * n_layer): the stream is a sum
        # of 2 * n_layer such writes, and this keeps its variance from growing with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied wte/lm_head counted once (parameters() already dedups them)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx, cache: KVCache | None = None):
        """Token ids (B, T) -> final hidden states (B, T, C), after ln_f."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens > block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def logits(self, x):
        """Hidden states (..., C) -> scores (..., vocab_size) of the real tokens only."""
        # The matmul runs over the padded table (its aligned shape is the point of padding);
        # the cut is a view, free.
        return self.lm_head(x)[..., :self.config.vocab_size]

    def forward(self, idx, targets=None, loss_chunk: int = 0):
        """idx, targets: (B, T) token ids. Returns (logits (B, T, vocab_size), mean loss or None).

        With `loss_chunk` > 0 and targets, the loss goes through ChunkedCrossEntropy, `loss_chunk`
        rows at a time, and the logits are not returned (None): training never needs them.
        """
        x = self.hidden(idx)  # (B, T, C)
        if targets is None:
            return self.logits(x), None
        if loss_chunk > 0:
            weight = self.lm_head.weight[:self.config.vocab_size]  # (V, C)
            with torch.autocast(device_type=x.device.type, enabled=False):  # float32 throughout
                loss = ChunkedCrossEntropy.apply(
                    x.flatten(0, 1).float(), weight.float(), targets.flatten(), loss_chunk)
            return None, loss
        logits = self.logits(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    # The three ways in and out of a GPT object besides training; their code sits with the
    # formats they read (OpenAI's safetensors below, our checkpoints in chapter 6).
    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "GPT":
        """OpenAI's weights: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" (downloaded from
        the Hugging Face hub once, then cached), or a folder written by save_pretrained."""
        return load_pretrained(name_or_path)

    def save_pretrained(self, path):
        """Write a folder that transformers.GPT2LMHeadModel.from_pretrained loads."""
        save_pretrained(self, path)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> "GPT":
        """The model of a training checkpoint written by this file."""
        return load_checkpoint_model(path, map_location)

    # -- Generation ------------------------------------------------------------------------------
    # Sampling is a loop: run the model, turn the last position's logits into a distribution,
    # draw a token, append it. Without a cache, every step re-runs the whole sequence: O(T^2)
    # work for T tokens. With the KV cache the prompt runs once ("prefill") and then each step
    # feeds only the newest token, attending to the keys and values stored for the rest.

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, use_cache: bool = True):
        """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + new).

        temperature 0 is greedy decoding; top_k keeps the k likeliest tokens, top_p the smallest
        set whose probability reaches p (nucleus sampling); seed makes the draws reproducible.

        Past block_size: the model has no position embedding beyond block_size, so once the
        sequence is longer, each new token is predicted from the last block_size tokens only,
        and the cache is rebuilt from that window every step (a full forward pass, as without a
        cache): generation past block_size runs at the no-cache speed, with identical tokens.
        """
        was_training = self.training
        self.eval()
        B, T = idx.shape
        out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
        out[:, :T] = idx
        generator = torch.Generator(device=idx.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        cache = None
        block = self.config.block_size
        for n in range(T, T + max_new_tokens):  # n = tokens so far
            if cache is not None and cache.pos == n - 1 and n <= block:
                step_input = out[:, n - 1:n]  # (B, 1): only the newest token is new
            else:
                step_input = out[:, max(0, n - block):n]  # (B, <= block): prefill / no cache
                if use_cache:
                    cache = cache or KVCache(self.config, B, block, idx.device,
                                             self.lm_head.weight.dtype)
                    cache.pos = 0
            x = self.hidden(step_input, cache)[:, -1]  # (B, C): only the last position matters
            out[:, n] = sample_next_token(self.logits(x).float(), temperature, top_k, top_p,
                                          generator)
        self.train(was_training)
        return out


def sample_next_token(logits, temperature: float, top_k: int | None, top_p: float | None,
                      generator: torch.Generator):
    """Draw one token per row from logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens strictly more likely than it already reach top_p; the
        # likeliest token always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)


# -- OpenAI's weights, in and out ---------------------------------------------------------------
# OpenAI's GPT-2 checkpoints live on the Hugging Face hub as `model.safetensors` + `config.json`.
# safetensors is a simple format, so we read and write it ourselves instead of depending on the
# `safetensors` or `transformers` packages:
#
#     8 bytes        little-endian uint64 N, the length of the header
#     N bytes        JSON: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
#                           "__metadata__": {...}}, padded with spaces
#     the rest       raw little-endian tensor bytes; offsets count from the end of the header
#
# Two more details. OpenAI wrote their linear layers as "Conv1D" modules storing (in, out)
# matrices, the transpose of nn.Linear's (out, in). And the hub's gpt2 files name tensors
# without the `transformer.` prefix that transformers' save_pretrained adds, and carry the
# causal-mask buffers `attn.bias` / `attn.masked_bias`, which are not weights at all.

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")
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
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n) if size > 8 + n else None
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            begin, end = info["data_offsets"]
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


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open `path.tmp` for writing; on success fsync it and rename it to `path`.

    A rename is atomic on POSIX and Windows: a reader (or a rerun after a crash) sees the old
    file or the complete new one, never half of one.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_dir(*parts: str) -> Path:
    """Our folder under the user's cache ($XDG_CACHE_HOME, default ~/.cache): never the repo."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "gpt2", *parts)


def download(url: str, dest: Path, retries: int = 3):
    """Stream url to dest with a progress bar. The bytes go to dest.part, which is renamed to
    dest only once complete (its size checked against Content-Length), so an interrupted
    download is never mistaken for a file; the next try resumes it with an HTTP Range request.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        try:
            headers = {"Range": f"bytes={have}-"} if have else {}
            with requests.get(url, headers=headers, stream=True, timeout=30) as r:
                if r.status_code in (401, 403, 404):
                    raise UserError(f"{url}: HTTP {r.status_code} {r.reason}")
                if r.status_code == 416:  # our .part is already complete (or garbage): restart
                    part.unlink()
                    continue
                r.raise_for_status()
                if r.status_code != 206:  # the server ignored Range: start over
                    have = 0
                total = have + int(r.headers.get("Content-Length", 0))
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total or None, initial=have, unit="B", unit_scale=True,
                        desc=dest.name, disable=None) as bar:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
            if total and part.stat().st_size != total:
                raise requests.ConnectionError(f"got {part.stat().st_size} of {total} bytes")
            os.replace(part, dest)
            return dest
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError) as e:
            if attempt == retries:
                raise UserError(f"cannot download {url}: {e} (no network? set HF_ENDPOINT, "
                                f"or pass a local folder)") from None
            time.sleep(2 ** attempt)


def hub_file(name: str, filename: str) -> Path:
    """openai-community/<name>/<filename> from the hub (HF_ENDPOINT), cached after the first time."""
    dest = cache_dir("hub", f"openai-community--{name}", filename)
    if not dest.exists():
        base = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        download(f"{base}/openai-community/{name}/resolve/main/{filename}", dest)
        if filename.endswith(".safetensors"):
            try:  # a file that parses is complete: otherwise drop it rather than keep a bad cache
                read_safetensors(dest)
            except UserError:
                dest.unlink()
                raise
    return dest


def config_from_hf(path) -> GPTConfig:
    try:
        hf = json.loads(Path(path).read_text())
        return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                         n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a GPT-2 config.json ({e!r})") from None


def hf_state_dict_to_ours(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either key layout (hub: `h.0...`; save_pretrained: `transformer.h.0...`) -> our names."""
    ours = {}
    for name, t in tensors.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers, and the tied copy of wte
        ours["transformer." + name] = t.t() if name.endswith(CONV1D_WEIGHTS) else t
    return ours


def load_pretrained(name_or_path: str) -> GPT:
    """Build a GPT from OpenAI's weights: a hub name (downloaded once) or a local folder."""
    if os.path.isdir(name_or_path):
        folder = Path(name_or_path)
        config_path, weights_path = folder / "config.json", folder / "model.safetensors"
        for p in (config_path, weights_path):
            if not p.exists():
                raise UserError(f"{folder} has no {p.name}: expected a folder written by "
                                f"save_pretrained (config.json + model.safetensors)")
    elif name_or_path in HUB_MODELS:
        config_path = hub_file(name_or_path, "config.json")
        weights_path = hub_file(name_or_path, "model.safetensors")
    else:
        raise UserError(f"unknown model {name_or_path!r}: use one of {', '.join(HUB_MODELS)} "
                        f"or a folder with config.json and model.safetensors")
    model = GPT(config_from_hf(config_path))
    load_weights(model, hf_state_dict_to_ours(read_safetensors(weights_path)), str(weights_path))
    return model


def load_weights(model: GPT, state: dict[str, torch.Tensor], source: str):
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


def save_pretrained(model: GPT, path):
    """Write config.json + model.safetensors as transformers' GPT2LMHeadModel expects them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    hf_config = dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="gelu_new",
        n_positions=c.block_size, n_ctx=c.block_size, vocab_size=c.vocab_size,
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_inner=None,
        layer_norm_epsilon=1e-5, initializer_range=0.02, bos_token_id=EOT, eos_token_id=EOT,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    with atomic_write(path / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte
        if name == "transformer.wte.weight":
            t = t[:c.vocab_size]  # padding rows are ours alone
        tensors[name] = t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t
    write_safetensors(path / "model.safetensors", tensors)


