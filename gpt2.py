"""GPT-2, from scratch, in one file: the model, its data, and how to train it on 1 to N GPUs.

Read it top to bottom, like a short book. Chapters 1 to 9 are the story; the appendices after
them hold the machinery a first reader can skip.

    1. GPT-2             GPTConfig and presets, attention, MLP, Block, GPT. Nothing else.
    2. Generation        the key/value cache, the sampler, generate().
    3. OpenAI's weights  the name mapping and the Conv1D transpose; a fine-tune's start.
    4. The data          llm.c's token shards; a loader that draws each step's sequences from
                         all over the data, each once per epoch, for any number of processes.
    5. The machine       what torchrun gives each process, device and precision, DDP, FSDP.
    6. Optimization      AdamW's parameter groups, Muon for the blocks' matrices, the schedule.
    7. Evaluation        validation loss over a fixed token budget, samples, HellaSwag.
    8. Checkpoints       what the training state holds, and exact resume.
    9. Training          the recipe (every hyperparameter, its default and why), then the loop.
    A. Speed tricks for one device: the CPU's chunked loss, the fast sampler, a batch-1 lm_head.
    B. Plumbing: files, downloads, checks, the agreement between processes.
    C. The tools: `sample`, `hellaswag`, `export`, `bench`, `plot`.
    D. The command line.

    python fineweb.py && python gpt2.py    # data, then train; torchrun ... gpt2.py on N GPUs

The weights' names (wte, wpe, h, ln_1, attn.c_attn, ...) are OpenAI's and Hugging Face's.

+- If you come from the video ("Let's reproduce GPT-2", build-nanogpt), what differs and why -+
| The training forward returns (None, loss): logits are never kept (6.6 GB of bf16 at B=64,  |
| T=1024), and the padded vocabulary rows are never scored or sampled. A step's sequences    |
| come from all over the data, each once per epoch, not one contiguous run of B * T tokens   |
| (neighbouring sequences of one text are nearly one sample), and are the same for any       |
| number of GPUs. Accumulation skips DDP's all-reduce with no_sync(). Checkpoints hold the    |
| optimizer, the loader's position and every random generator: --resume is bit-exact.        |
| Generation has a key/value cache; the precision follows the GPU (bf16 from Ampere, fp16 +  |
| loss scaling before); a CPU gets a chunked loss: 0.9 GiB less peak RSS (mini, measured).   |
+--------------------------------------------------------------------------------------------+
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import struct
import sys
import threading
import time
import traceback
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import hellaswag
from fineweb import (UNKNOWN_SIZE_CAP, Parser, UserError, atomic_write, cache_dir, check_finished,
                     download, exclusive_lock, gpt2_tokenizer, os_error_line, shard_digests)

# The GPT-2 tokenizer has 50,257 tokens: 256 bytes, 50,000 merges and <|endoftext|>, id 50256.
VOCAB_SIZE = 50257
EOT = 50256


# -----------------------------------------------------------------------------------------------
# 1. GPT-2
#
# GPT-2 (Radford et al., 2019) is a decoder-only transformer: token embeddings (wte) plus learned
# position embeddings (wpe), n_layer identical blocks, a final LayerNorm (ln_f), and a linear
# map back to the vocabulary (lm_head) that shares its weights with wte. Against GPT-1 the
# paper (section 2.3) makes three architectural changes: pre-LN, LayerNorm at each sub-block's
# input (x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)): the residual stream is a clean sum that
# gradients flow through untouched), a final LayerNorm after the last block, and residual
# projections scaled at init by 1/sqrt(N) for N of them (plus 50,257 tokens, 1024 of context).
#
# The four OpenAI sizes, and small ones that train on a laptop CPU in minutes. Parameter counts
# are with the tied 50,257-token embedding counted once (a test checks the 124M figure).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
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
    # Dropout 0.1 on attention weights, residual branches and embeddings: GPT-1's paper (4.1;
    # GPT-2's states none) and Hugging Face's GPT2Config. Pretraining does fine without it (0 in
    # build-nanogpt and nanoGPT); a small text's fine-tune overfits without. eval() turns it off.
    dropout: float = 0.0

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple_of
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
        config = cls(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})
        if config.n_embd % config.n_head:
            raise UserError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        return config


def causal_attention(q, k, v, dropout_p: float = 0.0, written_out: bool = False):
    """softmax(Q K^T / sqrt(d)) V, where each query sees only the keys up to its own position.

    q (B, nh, Tq, hs); k, v (B, nh, Tk, hs) with Tk >= Tq: the queries are the last Tq of the Tk
    positions (Tk > Tq when generation has cached the keys of earlier tokens, chapter 2), so
    query i sits at position Tk - Tq + i and sees keys 0 .. Tk - Tq + i.
    """
    Tq, Tk = q.size(-2), k.size(-2)
    if written_out:  # the formula, step by step: what the fused kernel below computes
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, Tq, Tk)
        visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        weights = F.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        return F.dropout(weights, dropout_p) @ v  # (B, nh, Tq, hs)
    # F.scaled_dot_product_attention picks a fused kernel (FlashAttention on recent GPUs) that
    # never materializes the (Tq, Tk) matrix. Its is_causal mask is aligned to the top-left
    # corner, right when queries and keys start together; one new query sees every key.
    if Tq == Tk or Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1, dropout_p=dropout_p)
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    """Multi-head attention: n_head heads of n_embd / n_head dimensions each, side by side."""

    written_out = False  # True: causal_attention's step-by-step formula instead of the kernel

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.layer = config.n_head, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # queries, keys, values
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True  # see GPT._init_weights
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # generation (chapter 2): also attend to earlier tokens' keys
            y = cache.attend(self, q, k, v)
        else:
            y = causal_attention(q, k, v, self.attn_dropout if self.training else 0.0,
                                 self.written_out)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU, project back (GPT-1's paper: 3072 for 768)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # OpenAI's code used the tanh approximation of GELU; we match it to load their weights
        # exactly (transformers calls it "gelu_new").
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, 4C) inside, (B, T, C) out


class Block(nn.Module):
    """One pre-LN transformer block: attention mixes positions, the MLP thinks per position."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (Press & Wolf, 2017), as in GPT-2: the matrix that turns a token into a
        # vector also turns the last vector back into token scores. Saves 38.6M parameters at
        # 124M (30% of the model) and helps, since both sides want similar tokens close.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # build-nanogpt's N(0, 0.02) for every matrix and embedding (OpenAI's wpe: 0.01), zero
        # biases. Projections writing into the residual stream are scaled by 1/sqrt(2 * n_layer):
        # the stream sums 2 * n_layer such writes; this keeps its variance from growing with depth.
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

    def hidden(self, idx, cache=None):
        """Token ids (B, T) -> final hidden states (B, T, C), after ln_f."""
        T = idx.size(1)
        # Token t sits at position t; after a cache's tokens, further on (chapter 2).
        pos = (cache.positions(T, idx.device) if cache is not None
               else torch.arange(T, device=idx.device))
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache)
        return self.transformer.ln_f(x)

    def logits(self, x):
        """Hidden states (..., C) -> scores (..., vocab_size) of the real tokens only."""
        # The matmul runs over the padded table (its aligned shape is the point of padding);
        # the cut is a view, free.
        return self.lm_head(x)[..., :self.config.vocab_size]

    def forward(self, idx, targets=None, loss_chunk: int = 0):
        """idx, targets: (B, T) token ids. Without targets: (logits (B, T, vocab_size), None).
        With targets: (None, mean cross-entropy): training never reads the logits, and keeping
        them alive until the next step would cost 6.6 GB of bf16 at B=64, T=1024."""
        x = self.hidden(idx)  # (B, T, C)
        if targets is None:
            return self.logits(x), None
        if loss_chunk > 0:  # the CPU's memory-saving road to the same loss: appendix A
            return None, chunked_cross_entropy(x, self.lm_head.weight, targets,
                                               self.config.vocab_size, loss_chunk)
        logits = self.logits(x)  # (B, T, V)
        return None, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# -----------------------------------------------------------------------------------------------
# 2. Generation
#
# Sampling is a loop: run the model, turn the last position's logits into a distribution, draw
# a token, append it. Without a cache, every step re-runs the whole sequence: O(T^2) work for T
# tokens. With the key/value cache the prompt runs once ("prefill") and then each step feeds
# only the newest token, which attends to the keys and values stored for all the others.
#
# The model hands a cache two jobs (chapter 1's `cache` argument): where the new tokens sit
# (`positions`) and the attention itself (`attend`), which stores the new keys and values and
# attends over all of them. hellaswag.py passes the model another object with the same two
# methods, to score a context and its four endings in one row.

class KVCache:
    """Keys and values of every layer for the positions seen so far, in buffers for `max_len`
    positions; `pos` is how many are filled. The buffers are made when the first keys arrive,
    in their dtype: under bf16 autocast, half the memory of float32 and no cast each step."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int):
        self.shape = (config.n_layer, batch_size, config.n_head, max_len,
                      config.n_embd // config.n_head)
        self.k = self.v = None
        self.pos = 0

    def positions(self, T: int, device):
        if self.pos + T > self.shape[3]:
            raise ValueError(f"{self.pos + T} positions > the cache's {self.shape[3]}")
        return torch.arange(self.pos, self.pos + T, device=device)

    def attend(self, attn: CausalSelfAttention, q, k, v):
        """Store this layer's new (B, nh, T, hs) keys and values; attend over all so far."""
        if self.k is None:
            self.k, self.v = (torch.zeros(self.shape, dtype=k.dtype, device=k.device) for _ in "kv")
        end = self.pos + k.size(2)
        self.k[attn.layer, :, :, self.pos:end] = k
        self.v[attn.layer, :, :, self.pos:end] = v
        if attn.layer == self.shape[0] - 1:  # the last layer has stored them: T more positions
            self.pos = end
        return causal_attention(q, self.k[attn.layer, :, :, :end], self.v[attn.layer, :, :, :end],
                                written_out=attn.written_out)


def sample_next_token(logits, temperature: float, top_k: int | None, top_p: float | None,
                      generator: torch.Generator, fast: bool = True):
    """Draw one token per row from logits (B, V): greedy at temperature 0, else from the softmax
    of logits / temperature, restricted to the top_k likeliest tokens and/or to the smallest
    set whose probability reaches top_p (nucleus sampling)."""
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
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if fast:  # the same distribution, drawn ~4x quicker: appendix A
        return draw_by_inverse_cdf(probs, generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)


@torch.inference_mode()
def generate(model: GPT, idx, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_cache: bool = True):
    """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + new).

    Past block_size the model has no position embedding, so each new token is predicted from
    the last block_size tokens only, and the cache is rebuilt from that window every step (a
    full forward pass, as without a cache): slower, with identical tokens.
    """
    B, T = idx.shape
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    generator = torch.Generator(device=idx.device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    block, cache = model.config.block_size, None
    logits_of = lm_head_for_generation(model, B)  # model.logits, or appendix A's faster copy
    was_training = model.training
    model.eval()
    try:
        for n in range(T, T + max_new_tokens):  # n = tokens so far
            if cache is not None and cache.pos == n - 1 and n <= block:
                step_input = out[:, n - 1:n]  # (B, 1): only the newest token is new
            else:
                step_input = out[:, max(0, n - block):n]  # (B, <= block): prefill / no cache
                if use_cache:
                    cache = cache or KVCache(model.config, B, block)
                    cache.pos = 0
            x = model.hidden(step_input, cache)[:, -1]  # (B, C): only the last position matters
            out[:, n] = sample_next_token(logits_of(x).float(), temperature, top_k, top_p,
                                          generator)
    finally:
        model.train(was_training)
    return out


# -----------------------------------------------------------------------------------------------
# 3. OpenAI's weights, in and out
#
# OpenAI's GPT-2 checkpoints live on the Hugging Face hub as `config.json` + `model.safetensors`
# (a simple format: a JSON header of names, shapes and offsets, then the raw bytes; we read and
# write it ourselves, appendix B). Two details make their tensors ours. OpenAI wrote the linear
# layers as "Conv1D" modules storing (in, out) matrices, the transpose of nn.Linear's
# (out, in). And the hub's files name tensors without the `transformer.` prefix that
# transformers' save_pretrained adds, and carry the causal-mask buffers `attn.bias` /
# `attn.masked_bias`, which are not weights at all.
#
# The same weights start a fine-tune (`--init_from`, chapter 8): the architecture is the
# source's, the optimizer and schedule start afresh. The way back out, save_pretrained, is
# `export`'s (appendix C).

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")


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
    config_path, weights_path = pretrained_files(name_or_path)  # appendix B, like the rest
    model = GPT(config_from_hf(config_path))
    # copied in with every name and shape checked (wte may be padded here)
    load_weights(model, hf_state_dict_to_ours(read_safetensors(weights_path)), str(weights_path))
    return model


# -----------------------------------------------------------------------------------------------
# 4. The data
#
# Training text is tokenized once, ahead of time, by fineweb.py into "shards": files of uint16
# token ids (the vocabulary fits in 16 bits), 100M tokens each, in llm.c's format, so shards
# from either project serve both:
#
#     1024 bytes    256 little-endian int32: magic 20240520, version 1, number of tokens, zeros
#     2 * n bytes   the tokens, little-endian uint16; each document starts with <|endoftext|>
#
# fineweb.py writes them (it must not import torch); we read them. The tests write with one
# and read with the other, so the two cannot drift apart.
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


def read_shard(path) -> np.ndarray:
    """The tokens of a shard as a read-only uint16 memmap (nothing is read until used)."""
    n = shard_length(path)  # from its header, checked against the file (appendix B)
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=4 * HEADER_INTS, shape=(n,))


def training_data(args, runtime: Runtime, position: dict | None = None):
    """The train loader (at a checkpoint's `position`, if given), the val tokens (None without
    a val shard) and the accumulation steps."""
    # fineweb.py's shards, *train* and *val*, in name order, of a folder it finished: appendix B
    train_files, val_files = data_files(args.data_dir)
    grad_accum = accumulation_steps(args, runtime.world_size)  # total / (B * T * processes)
    loader = ShardedDataLoader(train_files, args.batch_size, args.seq_len, grad_accum,
                               runtime.rank, runtime.world_size, args.seed, vocab_size=VOCAB_SIZE)
    agree_on_data(loader, args.data_dir, runtime)  # appendix B: every machine, the same shards
    if position is not None:
        loader.load_state_dict(position)
    return loader, val_split(val_files, args) if val_files else None, grad_accum


# The loader. A training sequence is a "window" of T + 1 tokens (the inputs, and the targets
# shifted by one); a shard of n tokens holds (n - 1) // T of them at stride T.
#
# The idea: each step's sequences are drawn from all over the data, every window once per epoch.
# Not one contiguous run of B * T tokens per micro-batch (build-nanogpt's; llm.c shuffles its
# shards and chunks, yet each micro-batch is one run): eight neighbouring sequences of one text
# are nearly one sample, and the step's gradient as noisy as a much smaller batch's. On Tiny
# Shakespeare the same model reaches a clearly lower val loss this way (docs/performance.md).
#
# How: each epoch shuffles the shards, and the windows inside each shard, with a permutation
# seeded by (seed, epoch): every process computes the same order without talking. Number the
# windows of the epochs laid end to end g = 0, 1, 2, ...; step s takes the W = B * grad_accum
# * world_size windows from s * W, and micro-step m of rank r the B of them at (m * world_size
# + r) * B. So the same step gets the same sequences whatever the split between processes and
# micro-batches, and the position is one integer: exact to save and restore.

class ShardedDataLoader:
    def __init__(self, files, batch_size: int, seq_len: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0, vocab_size: int | None = None):
        self.files = [str(f) for f in files]
        self.B, self.T, self.grad_accum = batch_size, seq_len, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.vocab_size = vocab_size  # if given, each shard's ids are checked when it is opened
        self.step_windows = batch_size * grad_accum * world_size  # W
        self.windows = np.array([max(0, (shard_length(f) - 1) // seq_len) for f in files])
        self.epoch_windows = int(self.windows.sum())
        if self.epoch_windows < self.step_windows:
            raise UserError(f"the train shards hold {self.epoch_windows:,} sequences of "
                            f"{seq_len + 1} tokens, fewer than one step needs "
                            f"({self.step_windows:,}): lower --total_batch_size")
        self.fingerprint = data_fingerprint(self.files)  # appendix B: is it the same data?
        self.step_start = self.micro = 0  # g of this step's first window; micro-step in it
        self._epoch = self._shard = None  # the orders read_windows is using, kept for the next

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_windows // self.step_windows

    def next_windows(self) -> torch.Tensor:
        """This rank's next micro-batch, (B, T + 1) int64: inputs [:, :-1], targets [:, 1:]."""
        first = self.step_start + (self.micro * self.world_size + self.rank) * self.B
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro, self.step_start = 0, self.step_start + self.step_windows
        return torch.from_numpy(self.read_windows(first, self.B).astype(np.int64))

    def next_batch(self):
        """The same, as inputs and targets, (B, T) each."""
        buf = self.next_windows()
        return buf[:, :-1], buf[:, 1:]

    def read_windows(self, first: int, count: int) -> np.ndarray:
        """Windows g = first ... first + count - 1 of the endless stream: (count, T + 1) tokens.

        Window g is window k = g % epoch_windows of epoch g // epoch_windows. In that epoch's
        shard order, shard order[p] holds the windows k from ends[p] - windows[shard] up to
        ends[p] (cumulative counts), and k is its window number k - (ends[p] - windows[shard])
        in that shard's own permutation. The count windows almost always lie in one epoch
        and one shard; at most two of each.
        """
        epoch, k = np.divmod(np.arange(first, first + count), self.epoch_windows)  # (count,)
        rows = np.empty((count, self.T + 1), dtype=np.uint16)
        for e in np.unique(epoch):
            if self._epoch is None or self._epoch[0] != e:
                order = np.random.default_rng([self.seed, e]).permutation(len(self.files))
                self._epoch = (e, order, np.cumsum(self.windows[order]))
            _, order, ends = self._epoch
            mine = np.flatnonzero(epoch == e)
            position = np.searchsorted(ends, k[mine], side="right")  # p, for each window
            for p in np.unique(position):
                shard = int(order[p])
                if self._shard is None or self._shard[:2] != (e, shard):
                    perm = np.random.default_rng([self.seed, e, shard]).permutation(self.windows[shard])
                    tokens = read_shard(self.files[shard])
                    check_token_ids(tokens, self.files[shard], self.vocab_size)  # appendix B
                    self._shard = (e, shard, perm, tokens)
                _, _, perm, tokens = self._shard
                here = mine[position == p]
                window = perm[k[here] - (ends[p] - self.windows[shard])]
                rows[here] = tokens[window[:, None] * self.T + np.arange(self.T + 1)]
        return rows

    def state_dict(self) -> dict:
        return dict(step_start=self.step_start, micro=self.micro, seq_len=self.T,
                    step_windows=self.step_windows, seed=self.seed,
                    files=[os.path.basename(f) for f in self.files], data=self.fingerprint)

    def load_state_dict(self, state: dict):
        for key in ("seq_len", "step_windows", "seed", "files", "data"):
            if state.get(key) != self.state_dict()[key]:
                raise UserError(f"cannot resume: the checkpoint's loader had {key}="
                                f"{state.get(key)!r}, this run has {self.state_dict()[key]!r}"
                                + (" (other shards under the same names)" if key == "data" else ""))
        self.step_start, self.micro = state["step_start"], state["micro"]


# -----------------------------------------------------------------------------------------------
# 5. The machine
#
# torchrun starts one process per GPU and tells each who it is in environment variables: RANK
# (0 .. WORLD_SIZE-1, unique across all machines), LOCAL_RANK (which GPU of this machine) and
# WORLD_SIZE. So the GPU is chosen by LOCAL_RANK, and "am I the one that prints and writes" by
# RANK == 0. Plain `python gpt2.py` has none of them: one process. NCCL talks between GPUs,
# gloo between CPU processes; gloo has no AVG reduction, so a mean is a SUM / world size.
#
# DDP (DistributedDataParallel) keeps a whole copy of the model on every GPU; each computes the
# gradients of its own micro-batch, and DDP averages them across GPUs during the backward pass,
# so every copy takes the same optimizer step and stays identical. That copy is 16 bytes per
# parameter with AdamW (weights, gradients, two moments, float32): 2 GB for 124M, nothing for
# an 80 GB GPU, but 25 GB for gpt2-xl. Sharding splits it over the N GPUs (ZeRO, Rajbhandari et
# al. 2020): the optimizer state (ZeRO-1), also the gradients (ZeRO-2), also the weights
# (ZeRO-3). `--fsdp` is ZeRO-3 by torch's FSDP2: each block's weights are gathered just before
# it runs and freed after, its gradients reduce-scattered to their owners (appendix B).
#
# The precision: bf16 autocast on GPUs whose tensor cores have it (matmuls in bf16; weights,
# reductions and the optimizer in float32: ~2x faster than TF32), fp16 with loss scaling on
# older GPUs (bf16 would be emulated there), float32 on the CPU and Apple's mps.

@dataclass
class Runtime:
    """Who this process is and what it computes on: one per process, made once."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """--device auto prefers a CUDA GPU, LOCAL_RANK's, then Apple's mps, then the CPU."""
    if name != "auto":
        return named_device(name, local_rank)  # checked: appendix B
    if torch.cuda.is_available():
        # Modulo the GPUs this process sees: a launcher may show each process only its own.
        return torch.device("cuda", (local_rank or 0) % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype auto: bf16 where tensor cores have it (compute capability 8.0, Ampere, and
    newer), fp16 on older GPUs (T4, V100), float32 on CPU and mps. Not is_bf16_supported(): on
    recent torch it says True on a T4 too, where bf16 is emulated and slower than float32."""
    if name != "auto":
        warn_if_emulated(DTYPES[name], device)  # appendix B
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.float32


def autocast_context(runtime: Runtime):
    """Mixed precision: matmuls in runtime.dtype, weights and reductions in float32. In float32
    no context at all (hellaswag.py holds it, since it may not import us)."""
    return hellaswag.autocast(runtime.device, runtime.dtype)


def setup_distributed(device: str, dtype: str, timeout_s: float = 3600,
                      backend: str = "auto") -> Runtime:
    """Read torchrun's variables, pick this process's device and join the process group.
    timeout_s bounds how long a collective waits for the slowest rank (--dist_timeout)."""
    rank, local_rank, world_size = torchrun_variables()  # checked; None without torchrun
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":  # in one process too: else a library's "cuda" means GPU 0 (~500 MB)
        torch.cuda.set_device(dev)
    if rank is None:
        return Runtime(device=dev, dtype=pick_dtype(dtype, dev))
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    join_process_group(backend, rank, world_size, timeout_s)  # appendix B, like the check
    return Runtime(rank, local_rank, world_size, dev, pick_dtype(dtype, dev))


def all_reduce_sum(t: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def say(runtime: Runtime, *message):
    """Print, from rank 0 only: one line per event, not one per GPU."""
    if runtime.is_main:
        print(*message, flush=True)


# -----------------------------------------------------------------------------------------------
# 6. Optimization
#
# AdamW with GPT-3's settings (Brown et al., 2020, appendix B): betas (0.9, 0.95), eps 1e-8,
# weight decay 0.1, applied only to the 2-D tensors (the matmul weights and embeddings), never
# to biases and LayerNorm gains, whose scale decay would only distort. The learning rate warms
# up linearly (early gradients are large and noisy), then follows a cosine down to min_lr.
#
# Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; torch.optim.Muon since
# torch 2.9), --optimizer muon, takes the blocks' four weight matrices: SGD's momentum, but each
# matrix's update replaced by the nearest orthogonal matrix (U V^T of its SVD, approximated by
# five Newton-Schulz iterations), so that all its directions move alike instead of the few that
# dominate the gradient. c_attn holds three matrices (Q, K, V), so its update is orthogonalized
# in three parts, as modded-nanogpt does. Embeddings, biases and LayerNorms stay with AdamW. It
# set the modded-nanogpt speedrun's records; on this model it reaches AdamW's loss in fewer steps
# (README).

def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, muon: dict | None = None):
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}  # the tied weight once
    matrices = {n: named.pop(n) for n in list(named) if muon and n.endswith(CONV1D_WEIGHTS)}
    params = list(named.values())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8)
    try:  # one kernel for all parameters: CUDA, and CPU/MPS on recent torch
        adamw = torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        adamw = torch.optim.AdamW(groups, **kwargs)
    return MuonAndAdamW(matrices, adamw, lr, **muon) if muon else adamw  # appendix B


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# -----------------------------------------------------------------------------------------------
# 7. Evaluation
#
# Three signals during training. The validation loss, over a fixed budget of tokens from the
# val shard: the same sequences whatever the number of processes or the micro-batch (each rank
# takes every world_size-th sequence; the summed losses are reduced), so curves compare; under
# training's autocast, always by the chunked float32 loss (GPUs train on the plain one). Samples
# from a fixed prompt, to see what the loss means. And benchmarks: HellaSwag (hellaswag.py),
# which small GPTs are compared on, and CORE's 22 tasks (core.py), nanochat's yardstick of GPT-2.

@torch.no_grad()
def evaluate_loss(model: GPT, tokens: np.ndarray, seq_len: int, batch_size: int, val_tokens: int,
                  runtime: Runtime, loss_chunk: int, stop: StopSignals | None = None) -> float:
    """Mean loss per token over the first val_tokens // seq_len sequences of the val shard."""
    model.eval()
    n_seq = min(val_tokens, len(tokens) - 1) // seq_len
    total = torch.zeros(2, dtype=accumulator_dtype(runtime.device), device=runtime.device)
    # This rank's sequences of each batch; a stop signal cuts it short on every rank (appendix B)
    for mine in evaluation_batches(n_seq, batch_size, stop, runtime):
        buf = torch.from_numpy(np.stack([tokens[s * seq_len:(s + 1) * seq_len + 1] for s in mine])
                               .astype(np.int64)).to(runtime.device)  # (b, T + 1)
        with autocast_context(runtime):
            _, loss = model(buf[:, :-1], buf[:, 1:], loss_chunk=loss_chunk)
        n = buf[:, 1:].numel()
        total += torch.stack([loss.to(total.dtype) * n, total.new_tensor(n)])  # [loss sum, tokens]
    all_reduce_sum(total, runtime)
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def evaluate(state: TrainState, args, runtime: Runtime, val_tokens, hellaswag_examples,
             last: bool, stop: StopSignals, core_tasks=None) -> dict:
    """The evaluation event of this step: val loss and samples, HellaSwag, CORE, each when due."""
    model = evaluation_model(state.model, runtime)  # --fsdp: a gathered, plain copy (appendix B)
    event, validates = dict(step=state.step), state.step % args.eval_every == 0 or last
    if val_tokens is not None and validates:
        # The chunked loss (appendix A) on GPUs too: the plain one would hold 13 GB of logits.
        event["val_loss"] = evaluate_loss(model, val_tokens, args.seq_len, args.batch_size,
                                          args.val_tokens, runtime, args.loss_chunk or 4096, stop)
    if hellaswag_examples and (state.step % args.hellaswag_every == 0 or last):
        stop.check(runtime)  # a signal during the val loss: no minute of HellaSwag more
        event["hellaswag"] = hellaswag.evaluate(  # acc_norm; each rank scores its share
            model, hellaswag_examples, runtime.device, rank=runtime.rank,
            world_size=runtime.world_size, autocast_dtype=runtime.dtype)["acc_norm"]
    event.update(core_event(model, core_tasks, args, runtime, state.step, last, stop))  # appendix B
    if runtime.is_main and args.num_samples and validates:
        event["samples"] = sample_texts(  # chapter 2's generate, from text to text: appendix C
            model, args.sample_prompt, args.num_samples, args.sample_tokens,
            runtime.device, args.seed)
    return event


# -----------------------------------------------------------------------------------------------
# 8. Checkpoints
#
# A checkpoint is everything needed to continue as if nothing had happened: the weights, the
# optimizer's moments, the gradient scaler, the step, the loader's position and every random
# number generator, with the config and flags it was made with. TrainState holds exactly that.
# Rank 0 writes it (every rank's copy is the same) to a temporary file renamed into place, so a
# crash mid-write leaves the previous checkpoint whole; the newest --keep_checkpoints stay. To
# resume, every rank must load the same file, the one rank 0 chose: one call (appendix B).

@dataclass
class TrainState:
    """What a checkpoint saves and restores (with the random number generators)."""
    model: GPT  # the raw model: its state_dict keys stay plain, whatever wraps it for training
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16's loss scaling; disabled (and empty) otherwise
    loader: ShardedDataLoader | None = None  # made once the micro-batch is known (chapter 9)
    step: int = 0  # optimizer steps taken
    spikes: dict = dataclasses.field(default_factory=dict)  # --skip_spikes' statistics

    def state_dict(self, args, rng: list[dict]) -> dict:  # rng: every rank's generators
        # The model's and the optimizer's in one format, sharded (--fsdp) or not: appendix B.
        return dict(step=self.step, model=model_state(self.model),
                    optimizer=optimizer_state(self.model, self.optimizer),
                    scaler=self.scaler.state_dict(), loader=self.loader.state_dict(), rng=rng,
                    config=asdict(self.model.config), args=vars(args), spikes=self.spikes)

    def load_state_dict(self, saved: dict, source, runtime: Runtime):
        if GPTConfig(**saved["config"]) != self.model.config:
            raise UserError(f"{source} is a {saved['config']} model, not this run's "
                            f"{asdict(self.model.config)}")
        load_model_state(self.model, saved["model"])  # appendix B, like the three below
        load_optimizer_state(self.optimizer, saved["optimizer"], self.model)
        load_scaler_state(self.scaler, saved["scaler"])
        restore_rng_states(saved["rng"], runtime, self.model.config.dropout)
        self.step, self.spikes = saved["step"], saved.get("spikes", {})


def start_state(args, runtime: Runtime) -> tuple[TrainState, dict | None]:
    """Step 0's state; with --resume, the newest checkpoint's, the same file on every rank.
    Also the checkpoint's loader position (None for a fresh run), for the loader to come."""
    agreed = load_agreed_checkpoint(args.log_dir, runtime) if args.resume else None  # appendix B
    state = new_train_state(args, runtime, agreed[1] if agreed else None)
    if not agreed:
        if args.resume:
            say(runtime, f"--resume: no checkpoint in {args.log_dir}, starting from step 0")
        return state, None
    state.load_state_dict(agreed[1], agreed[0], runtime)
    say(runtime, f"resumed from {agreed[0]} at step {state.step}")
    note_changed_flags(args, agreed[1], runtime)  # printed, then used; the checkpoint keeps them
    return state, agreed[1]["loader"]


def new_train_state(args, runtime: Runtime, resuming: dict | None = None) -> TrainState:
    """The state of step 0: random weights, or --init_from's; `resuming`, the checkpoint that
    will replace them, if any (a resumed fine-tune then never reads its source again)."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.init_from:
        refuse_size_flags(args)
        model = (GPT(finetune_config(args, resuming["config"])) if resuming
                 else local_rank0_first(runtime, lambda: pretrained_for_training(args)))
    else:
        model = GPT(model_config(args))
    # From here on each rank draws its own random numbers (dropout): the same masks on every
    # GPU would make a batch of n GPUs' micro-batches less random than one GPU's.
    torch.manual_seed(args.seed + 1 + runtime.rank)
    if args.seq_len > model.config.block_size:
        raise UserError(f"--seq_len {args.seq_len} > --block_size {model.config.block_size}")
    model = model.to(runtime.device)
    # --activation_checkpointing, --fsdp (appendix B): before the optimizer, which must see the
    # sharded parameters.
    prepare_for_memory(model, args, runtime)
    optimizer = configure_optimizer(model, args.max_lr, args.weight_decay, muon_settings(args))
    # fp16 needs loss scaling (its range is small: gradients underflow); bf16 and fp32 don't.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
    return TrainState(model, optimizer, scaler)


def save_checkpoint(state: TrainState, args, runtime: Runtime):
    """Rank 0 writes this step's checkpoint (with every rank's random generators) and drops
    this run's oldest; the other ranks go on."""
    rng = gather_rng_states(runtime)  # appendix B, like the write and the rotation
    contents = state.state_dict(args, rng)  # on every rank: under --fsdp, gathered from all
    path = checkpoint_path(args.log_dir, state.step)
    if runtime.is_main:
        write_checkpoint(path, contents)
        rotate_checkpoints(path, args.keep_checkpoints)
    return path


# -----------------------------------------------------------------------------------------------
# 9. Training
#
# First the recipe: every hyperparameter of a run, as a flag, with its default and the reason
# for it. The defaults are GPT-2 124M on FineWeb-Edu's 10B tokens, build-nanogpt's settings,
# which are GPT-3 small's: `torchrun --standalone --nproc_per_node=8 gpt2.py` runs it as is.
# (The flags that choose the machine rather than the run, and the other commands', are in
# appendix D.)

def add_recipe_flags(p):
    add_model_flags(p)
    flag = p.add_argument_group("the recipe").add_argument
    flag("--batch_size", type=batch_size_or_auto, default="auto",
         help="micro-batch B per process; auto: the largest that fits this GPU (8 on a CPU). "
              "Gradient accumulation keeps --total_batch_size, so the run is the same")
    flag("--seq_len", type=int_at_least(1), default=1024, help="sequence length T, GPT-2's")
    flag("--total_batch_size", type=int_at_least(1), default=2 ** 19,
         help="tokens per optimizer step: 2**19 ~ 0.5M, GPT-3 small's batch")
    flag("--max_steps", type=int_at_least(0), default=0,
         help="optimizer steps; 0: --num_epochs of the data (10B tokens: ~19,000 steps)")
    flag("--num_epochs", type=int_at_least(1), default=1, help="passes over the data if no --max_steps")
    flag("--max_lr", type=positive_float, default=6e-4, help="peak learning rate, GPT-3 small's")
    flag("--min_lr_ratio", type=fraction, default=0.1, help="final lr / max_lr (GPT-3: 10%%)")
    flag("--warmup_steps", type=int_at_least(0), default=715,
         help="linear warmup: GPT-3 warms up over 375M tokens = 715 steps of 2**19")
    flag("--weight_decay", type=float_at_least_0, default=0.1, help="AdamW's, on 2-D weights (GPT-3)")
    flag("--grad_clip", type=positive_float, default=1.0, help="max gradient norm (GPT-3)")
    flag("--optimizer", choices=["adamw", "muon"], default="adamw",
         help="muon: Muon for the blocks' matrices, AdamW for the rest (chapter 6); the default "
              "stays GPT-3's AdamW until Muon is measured at 124M on GPUs")
    flag("--muon_lr", type=positive_float, default=0.02, help="Muon's peak lr (nanochat's)")
    flag("--muon_momentum", type=fraction, default=0.95, help="Muon's momentum, fixed (torch's default)")
    flag("--muon_weight_decay", type=float_at_least_0, default=0.0, help="Muon's decoupled decay")
    flag("--muon_qkv", choices=["split", "whole"], default="split", help="orthogonalize c_attn's "
         "Q, K, V apart (modded-nanogpt's; lower val loss on the README's recipe) or as one matrix")
    flag("--seed", type=int_at_least(0), default=1337, help="initial weights and data order")
    flag("--eval_every", type=int_at_least(1), default=250, help="steps between evaluations")
    flag("--val_tokens", type=int_at_least(1), default=10_485_760,
         help="validation budget: 10M tokens, build-nanogpt's 20 x 64 x 1024 x 8")
    flag("--hellaswag_every", type=int_at_least(0), default=250, help="steps between HellaSwag "
         "evaluations, its own schedule (0: never)")
    flag("--core_every", type=int_at_least(0), default=0, help="steps between CORE evals (0: never)")
    flag("--checkpoint_every", type=int_at_least(1), default=1000, help="steps between checkpoints")


# Then the run, top-down. One optimizer step, in order: set the learning rate; run grad_accum
# micro-batches forward and backward; clip the gradient norm to 1.0 (GPT-3's value: one bad
# batch cannot throw the model far); take the optimizer step. Once in a while, evaluate and
# write a checkpoint. The step waits for the GPU once, to read back the loss for the log.
#
# Two models: `state.model`, the raw GPT that checkpoints save and evaluation runs, and
# `train_model`, the same parameters wrapped for speed (torch.compile) and for several GPUs
# (DDP). Evaluation and generation use the raw one: they need no gradient sync, and a compiled
# model would recompile for their shapes.

def wrap_for_training(model: GPT, args, runtime: Runtime) -> nn.Module:
    """torch.compile, then DDP around the compiled model (torch's advice: compile handles DDP's
    wrapper poorly, so compile the inner module); in between, --batch_size auto (appendix B)."""
    if args.fsdp:
        return model  # sharded, each block compiled, by prepare_for_memory (appendix B)
    # dynamic=False: one graph per shape, so the sizes tried never make it compile a slower,
    # shape-generic one.
    train_model = torch.compile(model, dynamic=False) if args.compile == "on" else model
    if args.batch_size == "auto":
        args.batch_size = fitting_batch_size(train_model, args, runtime)
    if runtime.ddp:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=device_ids)
    return train_model


def train(args):
    """The whole run, in the order things happen."""
    runtime = setup_distributed(args.device, args.dtype, args.dist_timeout, args.dist_backend)
    # Plumbing (appendix B): a rank that fails stops the others at once, with its message; the
    # run holds its --log_dir alone; SIGTERM (a cluster's notice), SIGUSR1 and Ctrl-C ask it
    # to stop after the current step, with a checkpoint.
    with fail_together(runtime), own_log_dir(args, runtime), StopSignals() as stop:
        check_before_start(args, runtime)  # the flags and the data, before anything slow
        apply_speed_settings(args, runtime.device)  # appendix A
        run_training(args, runtime, stop)


def run_training(args, runtime: Runtime, stop: StopSignals):
    # Resumed before compile and DDP: DDP copies rank 0's weights when it wraps the model.
    state, position = start_state(args, runtime)  # chapter 8
    train_model = wrap_for_training(state.model, args, runtime)
    loader, val_tokens, grad_accum = training_data(args, runtime, position)  # chapter 4
    state.loader = loader
    max_steps = run_length(args, loader, state)  # --max_steps, or --num_epochs of the data
    hellaswag_examples, core_tasks = load_hellaswag(args, runtime), load_core(args, runtime)
    # log.jsonl and the console, with MFU; a fresh run's first event is its config (appendix B)
    log = EventLog(args, runtime, state, grad_accum, max_steps, stop)
    stop.on_stop(lambda: save_checkpoint(state, args, runtime))  # mid-evaluation: save at once
    while True:
        last = state.step >= max_steps
        # Once in a while, evaluate (once a step: a resumed run's log may hold this one).
        if evaluation_due(state.step, args, last) and not log.evaluated(state.step):
            log.write(**evaluate(state, args, runtime, val_tokens, hellaswag_examples, last, stop,
                                 core_tasks))
        if last:
            break

        # One optimizer step.
        t0 = time.perf_counter()
        lr = get_lr(state.step, args.max_lr, args.max_lr * args.min_lr_ratio, args.warmup_steps,
                    max_steps)
        for group in state.optimizer.param_groups:  # Muon's groups follow the same curve, scaled
            group["lr"] = lr * group.get("lr_scale", 1.0)
        state.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=runtime.device)
        for micro in range(grad_accum):
            windows = to_device(loader.next_windows(), runtime.device)  # (B, T + 1): appendix A
            x, y = windows[:, :-1], windows[:, 1:]  # the targets: the inputs, one token later
            # DDP all-reduces the gradients during backward: only on the last micro-batch.
            # no_sync() must be entered before the forward pass, which records the intent.
            # (FSDP reduce-scatters each micro-batch's, by choice: waiting keeps them unsharded.)
            syncs = micro == grad_accum - 1 or not isinstance(train_model, nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if syncs else train_model.no_sync():
                with autocast_context(runtime):
                    _, loss = train_model(x, y, loss_chunk=args.loss_chunk)
                # backward() adds each micro-batch's gradients to the last: divided by
                # grad_accum, their sum is the gradient of the mean loss over the whole step,
                # as if it had been one batch of total_batch_size tokens.
                loss = loss / grad_accum
                loss_sum += loss.detach()
                state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)  # fp16: the true gradients, before clipping
        norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), args.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        # One read-back from the GPU: the mean loss, the norm, and whether a rank must stop.
        loss, norm, stopping = (all_reduce_sum(torch.stack([loss_sum, norm, stop.flag(norm)]),
                                               runtime) / runtime.world_size).tolist()
        # Appendix B: a bad step is neither taken nor saved; an outlier (--skip_spikes) skipped.
        if not (skipped := check_finite(loss, norm, state, args)):
            state.scaler.step(state.optimizer)
        state.scaler.update()
        dt = time.perf_counter() - t0
        state.step += 1
        log.write(step=state.step - 1, loss=loss, lr=lr, norm=norm, ms=1000 * dt,
                  tokens_per_s=args.total_batch_size / dt, **skipped)

        # Once in a while, at the end, and when asked to stop, a checkpoint.
        if state.step % args.checkpoint_every == 0 or state.step == max_steps or stopping:
            save_checkpoint(state, args, runtime)
        if stopping:
            raise stop.stopped(state.step, checkpoint_path(args.log_dir, state.step), runtime)


# ===============================================================================================
# A. Appendix: speed tricks for one device
#
# The story is complete without this appendix: each trick here is the default where it pays,
# called from the story in one line, and computes what the simple code beside that line does.
# ===============================================================================================

def enable_tf32(device: torch.device):
    if device.type == "cuda":
        # TF32: float32 matmuls on tensor cores with a 10-bit mantissa, ~8x faster on A100.
        torch.set_float32_matmul_precision("high")


def apply_speed_settings(args, device: torch.device):
    """The device-dependent defaults shared by training and `bench`."""
    enable_tf32(device)
    if args.loss_chunk < 0:  # auto: the chunked loss below on CPUs; GPUs do better compiled
        args.loss_chunk = 256 if device.type == "cpu" else 0
    if args.compile == "auto":
        # The video measured 300 -> 130 ms per step on an A100 from torch.compile (build-nanogpt
        # ships it off); on a CPU it gained nothing here and costs ~20 s (docs/performance.md).
        reason = why_not_compile(device)
        args.compile = "off" if reason else "on"
        if reason and device.type == "cuda" and os.environ.get("RANK", "0") == "0":
            print(f"--compile auto: off, {reason}", file=sys.stderr, flush=True)


def why_not_compile(device: torch.device) -> str | None:
    """Why torch.compile cannot run on this device, or None if it can: on GPUs it needs Triton
    (which Windows lacks) and compute capability 7.0 (Triton refuses older GPUs)."""
    if device.type != "cuda":
        return "it gains nothing on this device"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (there is none for Windows)"
    capability = torch.cuda.get_device_capability(device)
    if capability < (7, 0):
        return f"Triton needs compute capability 7.0, this GPU has {capability[0]}.{capability[1]}"
    return None


# The CPU's chunked cross-entropy (GPT.forward with loss_chunk > 0; --loss_chunk, auto on CPUs).
# At B=8, T=256 the float32 logits are 2048 x 50304 x 4 bytes = 412 MB, and the plain loss makes
# several such tensors per step (logits, softmax, their gradients). On a CPU each one is a fresh
# mmap from the C allocator, returned to the kernel when freed and faulted in again page by page
# the next step: ~470,000 page faults and ~0.7 s of system time per step, measured. The chunked
# loss walks over `chunk` rows at a time into one reused buffer, and computes the gradients
# right away in the forward pass (the softmax just made *is* most of the gradient: d loss /
# d logits = softmax - onehot), so backward only scales them. Same matmuls, same FLOPs, no 412 MB
# temporaries: faster, and 0.9 GiB less peak RSS for mini at B=8, T=256 (docs/performance.md).
# Each chunk's logits are made transposed, (V, n) = weight @ x.T: on a CPU that matmul runs
# ~1.5x faster than x @ weight.T (its long dimension is the rows of the output), and the softmax
# then reduces over rows, which vectorizes along the n columns.

class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `x @ weight.T` against targets, without ever holding all the logits."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk: int, needs_grad: bool):
        # x: (N, C) final hidden states, weight: (Vp, C) the whole (maybe padded) table,
        # targets: (N,). Rows >= vocab_size are padding: their logits are set to -inf, so they
        # get probability 0 and gradient 0 (taking the full table spares autograd a 51 MB
        # zero-padded copy of a sliced weight's gradient). needs_grad is passed in because
        # inside forward grad mode is off, and needs_input_grad ignores no_grad().
        N, V = x.size(0), weight.size(0)
        grad_x = torch.empty_like(x) if needs_grad else None
        grad_w = torch.empty_like(weight) if needs_grad else None
        scratch = x.new_empty(V * min(chunk, N))  # one chunk's logits, reused by every chunk
        loss_sum = x.new_zeros((), dtype=accumulator_dtype(x.device))
        for start in range(0, N, chunk):
            xc, tc = x[start:start + chunk], targets[start:start + chunk]  # (n, C), (n,)
            n = len(tc)
            logits = torch.mm(weight, xc.t(), out=scratch[:V * n].view(V, n))  # (V, n)
            logits[vocab_size:] = float("-inf")
            target_logits = logits.gather(0, tc[None, :])  # (1, n)
            # log-sum-exp by hand, in place: torch.logsumexp would allocate another (V, n).
            peak = logits.amax(dim=0, keepdim=True)  # (1, n), for a stable exp
            probs = logits.sub_(peak).exp_()  # unnormalized softmax, in the scratch buffer
            total = probs.sum(dim=0, keepdim=True)  # (1, n)
            loss_sum += (total.log() + peak - target_logits).sum()
            if needs_grad:
                # d loss / d logits = softmax - onehot(target) = probs / total - onehot. The
                # division by total and the onehot are applied to the small (n, C) operands
                # of the two matmuls instead of to the big (V, n) buffer: one pass fewer.
                gx = grad_x[start:start + chunk]
                torch.mm(probs.t(), weight, out=gx).div_(total.t()).sub_(weight[tc])  # (n, C)
                grad_w.addmm_(probs, xc / total.t(), beta=0 if start == 0 else 1)  # (V, C)
                grad_w.index_add_(0, tc, xc, alpha=-1)  # beta=0 on the first: overwrite
        ctx.save_for_backward(grad_x, grad_w)
        ctx.n = N
        return (loss_sum / N).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n
        # In place: these buffers are ours alone, and a 51 MB copy per step is not free.
        return grad_x.mul_(scale), grad_w.mul_(scale), None, None, None, None


@torch.compiler.disable  # a hand-written loop of in-place kernels: nothing for a compiler to fuse
def chunked_cross_entropy(x, weight, targets, vocab_size: int, chunk: int):
    """Mean cross-entropy of (B, T, C) hidden states against (B, T) targets, in float32."""
    # Autocast off: these matmuls accumulate a loss over the whole vocabulary. (mps never
    # autocasts here, and torch.autocast("mps", enabled=False) raises before torch 2.5.)
    off = (contextlib.nullcontext() if x.device.type == "mps"
           else torch.autocast(device_type=x.device.type, enabled=False))
    with off:
        return ChunkedCrossEntropy.apply(x.flatten(0, 1).float(), weight.float(),
                                         targets.flatten(), vocab_size, chunk,
                                         torch.is_grad_enabled())


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch onto the device: on CUDA from pinned memory and without waiting, so the copy
    overlaps the GPU's work. `t` must be contiguous (the loader's whole (B, T + 1) windows, not
    the inputs and targets, two strided views of them): pin_memory() of a strided view makes a
    pageable temporary, and the copy would wait after all."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def draw_by_inverse_cdf(probs, generator: torch.Generator):
    """One token per row of probs (B, V), as torch.multinomial(probs, 1) would draw it: one
    uniform number per row, found in the running sum by binary search. torch.multinomial
    draws an exponential variable per token instead: ~1 ms for 50,257 tokens, more than the
    rest of the sampling together. In float64 (float32 on mps, which has none): a float32
    running sum over 50,257 tokens loses the smallest probabilities to rounding."""
    cdf = probs.to(accumulator_dtype(probs.device)).cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]  # ~1
    u = torch.rand(total.shape, dtype=cdf.dtype, device=probs.device, generator=generator)
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # u < total
    # right=True: the first token whose cdf exceeds u, so a token of probability 0 is never hit.
    return torch.searchsorted(cdf, u, right=True).squeeze(1)  # (B,)


def lm_head_for_generation(model: GPT, batch_size: int):
    """x (B, C) -> logits (B, V) for generate(): model.logits, except at batch 1 on a CPU.

    There each step multiplies one hidden state by the (V, C) lm_head table, and reading that
    table is most of a step's time: a matrix-vector product x @ W.T reads a contiguous (C, V)
    copy ~2.4x faster than the (V, C) original (docs/performance.md). The copy is made once per
    call, from the current weights (never stale), and costs V * C * 4 bytes while generating:
    51 MB for the mini preset, 155 MB for 124M. GPUs read either layout at full speed, and with
    several rows weight @ x.T (the table in its own layout) is the quick form.
    """
    weight, V = model.lm_head.weight, model.config.vocab_size
    if batch_size == 1 and weight.device.type == "cpu":
        head_t = weight.t().contiguous()  # (C, V)
        return lambda x: (x @ head_t)[:, :V]
    return lambda x: (weight @ x.t()).t()[:, :V]


# ===============================================================================================
# B. Appendix: plumbing
#
# Nothing in this appendix is about GPT-2. It is what a program needs to meet real files,
# networks, flags and clusters: the safetensors bytes, the hub download, the shard header's
# checks, device names, the random generators' and the optimizer's serialisation, the
# checkpoint every process agrees on, the peak-FLOPs table, the event log, argument checks.
# ===============================================================================================

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


# What OpenAI's models are, to check what a hub or a mirror (HF_ENDPOINT) serves under their
# names: each one's architecture, and the bytes of gpt2's weights (548,105,171 bytes, sha256 as
# published for openai-community/gpt2). The downloader also checks the size and sha256 the hub
# itself sends with each file (X-Linked-Size and X-Linked-Etag).
HUB_ARCHITECTURES = {name: dict(PRESETS[name], block_size=1024, vocab_size=VOCAB_SIZE)
                     for name in HUB_MODELS}
HUB_WEIGHTS = {"gpt2": (548_105_171,
                        "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707")}


def hub_file(name: str, filename: str) -> Path:
    """openai-community/<name>/<filename> from the hub (HF_ENDPOINT), cached after the first
    time, checked: a file that is not what the name promises is deleted, not kept."""
    dest = cache_dir("hub", f"openai-community--{name}", filename)
    if dest.exists():
        return dest
    base = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    size, sha256 = HUB_WEIGHTS.get(name, (None, None)) if filename == "model.safetensors" else (None, None)
    # a size the hub does not say is capped: gpt2-xl's float32 weights are 6.4 GB, a config 1 KB
    most = 8 * 10**9 if filename == "model.safetensors" else UNKNOWN_SIZE_CAP
    download(f"{base}/openai-community/{name}/resolve/main/{filename}", dest, size=size, sha256=sha256,
             max_size=most, offline="set HF_ENDPOINT, or pass a local folder (--model or --init_from FOLDER)")
    try:
        if filename == "config.json":
            served = asdict(config_from_hf(dest))
            expected = HUB_ARCHITECTURES[name]
            if any(served[k] != v for k, v in expected.items()):
                raise UserError(f"{base} serves as {name} a model of {served['n_layer']} layers, "
                                f"{served['n_head']} heads, {served['n_embd']} wide; OpenAI's has "
                                f"{expected['n_layer']}, {expected['n_head']}, {expected['n_embd']}: "
                                f"a wrong mirror (HF_ENDPOINT)?")
        else:
            read_safetensors(dest)  # a file that parses is complete
    except UserError:
        dest.unlink()
        raise
    return dest


def pretrained_files(name_or_path: str) -> tuple[Path, Path]:
    """config.json and model.safetensors of a hub name (downloaded once) or a local folder."""
    if os.path.isdir(name_or_path):
        folder = Path(name_or_path)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).exists():
                raise UserError(f"{folder} has no {name}: expected a folder written by "
                                f"save_pretrained (config.json + model.safetensors)")
        return folder / "config.json", folder / "model.safetensors"
    if name_or_path in HUB_MODELS:
        return hub_file(name_or_path, "config.json"), hub_file(name_or_path, "model.safetensors")
    raise UserError(f"unknown model {name_or_path!r}: use one of {', '.join(HUB_MODELS)} "
                    f"or a folder with config.json and model.safetensors")


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


HF_CONFIG_SIZES = {"n_positions": "block_size", "vocab_size": "vocab_size", "n_layer": "n_layer",
                   "n_head": "n_head", "n_embd": "n_embd"}


def config_from_hf(path) -> GPTConfig:
    """A config.json's architecture, each size a whole number above 0 that the model can be."""
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
    return GPTConfig(**sizes)


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


def check_before_start(args, runtime: Runtime):
    """What the flags and the data folder alone refuse, refused before anything slow: building
    the model, reading a checkpoint, trying micro-batches on the GPU (--batch_size auto)."""
    data_files(args.data_dir)
    if args.val_tokens < args.seq_len:
        raise UserError(f"--val_tokens {args.val_tokens} < --seq_len {args.seq_len}: not one "
                        f"validation sequence")
    # the step must split into micro-batches: at --batch_size auto, at least into ones of 1
    smallest = 1 if args.batch_size == "auto" else args.batch_size
    accumulation_steps(argparse.Namespace(**{**vars(args), "batch_size": smallest}),
                       runtime.world_size)


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


def val_split(val_files, args) -> np.ndarray:
    """The val shard's tokens, checked to hold the sequences --val_tokens asks for."""
    tokens = read_shard(val_files[0])
    check_token_ids(tokens, val_files[0], VOCAB_SIZE)
    if len(tokens) < args.seq_len + 1:
        raise UserError(f"{val_files[0]}: {len(tokens)} tokens, fewer than one sequence of "
                        f"--seq_len {args.seq_len} + 1: write a larger validation split "
                        f"(fineweb.py --val_size) or lower --seq_len")
    return tokens


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


def named_device(name: str, local_rank: int | None) -> torch.device:
    """--device cpu, cuda, cuda:N or mps, checked. Under torchrun (local_rank given) a plain
    `cuda` means LOCAL_RANK's GPU, modulo the GPUs this process sees (SLURM's --gpus-per-task
    shows each process one, cuda:0, while numbering the processes 0..7)."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but torch sees no CUDA GPU")
        if device.index is not None and local_rank is not None:
            raise UserError(f"--device {name} under torchrun: every process would use that one "
                            f"GPU; pass --device cuda and each takes its LOCAL_RANK's")
        index = device.index if device.index is not None else (local_rank or 0)
        return torch.device("cuda", index % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps, but torch has no MPS backend here")
    return device


def torchrun_variables() -> tuple[int | None, int | None, int | None]:
    """(RANK, LOCAL_RANK, WORLD_SIZE) as torchrun sets them, checked before anything waits on
    them; (None, None, None) without RANK: one process."""
    if "RANK" not in os.environ:
        return None, None, None
    if "WORLD_SIZE" not in os.environ:
        raise UserError(f"RANK={os.environ['RANK']} is set but WORLD_SIZE is not: start the "
                        f"processes with torchrun, which sets both (or unset RANK)")
    values = {}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        text = os.environ.get(name, "0")
        try:
            values[name] = int(text)
        except ValueError:
            raise UserError(f"{name}={text!r} is not a whole number (torchrun sets it)") from None
    rank, local_rank, world_size = values.values()
    if not 0 <= rank < world_size or local_rank < 0:
        raise UserError(f"RANK {rank} of WORLD_SIZE {world_size} (LOCAL_RANK {local_rank}): "
                        f"RANK must be 0 .. WORLD_SIZE - 1, LOCAL_RANK 0 or more (torchrun sets "
                        f"them)")
    return rank, local_rank, world_size


RENDEZVOUS_S = 300  # processes a launcher starts together meet in seconds, not an hour


def join_process_group(backend: str, rank: int, world_size: int, timeout_s: float):
    """init_process_group, its rendezvous (every process connecting to MASTER_ADDR:MASTER_PORT)
    first, waiting at most RENDEZVOUS_S or --dist_timeout: a process whose partners never
    start (WORLD_SIZE=2, one process) or a port another program holds is one line soon, not a
    traceback after the hour --dist_timeout gives the collectives."""
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UserError(f"RANK and WORLD_SIZE are set, MASTER_ADDR and MASTER_PORT not ({where}):"
                        f" start the processes with torchrun, which sets them")
    wait = min(timeout_s, RENDEZVOUS_S)
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, world_size,
                                           timeout=datetime.timedelta(seconds=wait)))
    except (RuntimeError, ValueError) as e:  # torch's DistNetworkError, DistStoreError, ...
        said = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("another program holds MASTER_PORT: give torchrun another --master_port"
                if "EADDRINUSE" in str(e) or "in use" in str(e) else
                f"not all {world_size} processes of WORLD_SIZE started within {wait:.0f} s: start "
                f"every one (torchrun --nproc_per_node, --nnodes)" if "out" in said.lower() else
                "check MASTER_ADDR and MASTER_PORT")
        raise UserError(f"cannot join the process group at {where} as rank {rank} of "
                        f"{world_size}: {hint} ({said})") from None
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def warn_if_emulated(dtype: torch.dtype, device: torch.device):
    if dtype == torch.bfloat16 and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            print(f"warning: --dtype bfloat16 on a GPU of compute capability "
                  f"{capability[0]}.{capability[1]}: emulated, slower than float32; --dtype auto "
                  f"picks float16 with loss scaling", file=sys.stderr, flush=True)


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums over many terms, except on Apple's mps, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


LEFTOVER_NAME = re.compile(r"(ckpt_\d{8}\.pt|log\.jsonl)\.\d+\.[0-9a-f]{8}\.tmp")


@contextlib.contextmanager
def own_log_dir(args, runtime: Runtime):
    """--log_dir, held by this run alone for its life (rank 0 writes everything in it).

    A fresh run (no --resume) in a folder that holds a run is refused, unless --overwrite says
    to delete that run's log and checkpoints: otherwise the new run would interleave its log
    with the old one and overwrite its checkpoints. A dead run's half-written temporary files
    (19 GB for gpt2-xl) are removed: holding the lock, we know no live run is writing them.
    """
    if not runtime.is_main:
        yield
        return
    log_dir = Path(args.log_dir)
    if log_dir.exists() and not log_dir.is_dir():
        raise UserError(f"--log_dir {log_dir} is a file, not a folder")
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--log_dir {log_dir}: cannot create it ({e.strerror})") from None
    with exclusive_lock(log_dir / ".lock", busy=f"another run is using {log_dir}: wait for it "
                                                f"to finish, or give this one another --log_dir"):
        for leftover in log_dir.glob("*.tmp"):  # atomic_write's names for ours, and only those
            if LEFTOVER_NAME.fullmatch(leftover.name):
                leftover.unlink(missing_ok=True)
        held = [p for p in [log_dir / "log.jsonl", *list_checkpoints(log_dir)] if p.exists()]
        if held and not args.resume:
            if not args.overwrite:
                raise UserError(f"{log_dir} holds a run ({', '.join(p.name for p in held[:3])}"
                                f"{', ...' if len(held) > 3 else ''}): continue it with "
                                f"--resume, or start over with --overwrite (deletes them)")
            for path in held:
                path.unlink()
        yield


@contextlib.contextmanager
def out_of_memory_as_one_line():
    """A GPU out of memory is a flag to change, not a bug: one line that names it."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError("out of GPU memory: lower --batch_size (or use --batch_size auto); "
                        "gradient accumulation keeps --total_batch_size, so the run optimizes "
                        "the same") from None


FAILURE_KEY = "gpt2/failed"  # in the process group's store: which rank failed, and why


@contextlib.contextmanager
def fail_together(runtime: Runtime):
    """A rank that fails stops every rank at once, each with the failing rank's message.

    Without this, the others wait in their next collective for the failed one until
    --dist_timeout (an hour): NCCL cannot tell a dead peer from a slow one, and leaving the
    process group politely (destroy_process_group) can itself wait on them. So the failing
    rank writes its message into the store all ranks share (torchrun's rendezvous) and exits
    without leaving; every rank watches that store from a thread, and exits with the message.
    """
    if not runtime.ddp:
        with out_of_memory_as_one_line():
            yield
        return
    store = dist.distributed_c10d._get_default_store()
    watching = threading.Event()
    watching.set()
    threading.Thread(target=watch_for_failure, args=(store, watching), daemon=True).start()
    try:
        with out_of_memory_as_one_line():
            yield
    except Stopped:
        watching.clear()
        dist.destroy_process_group()  # every rank stopped together: leave politely
        raise
    except BaseException as e:
        watching.clear()
        first = not store_has(store, FAILURE_KEY)
        bug = not isinstance(e, (UserError, OSError, KeyboardInterrupt))
        reason = (f"{type(e).__name__}: {e}" if bug else os_error_line(e) if isinstance(e, OSError)
                  else "interrupted" if isinstance(e, KeyboardInterrupt) else str(e))
        if first:
            with contextlib.suppress(Exception):
                store.set(FAILURE_KEY, f"rank {runtime.rank}: {reason}")
        if first or not bug:
            if bug:  # not the user's: its traceback, and the rank it hit
                traceback.print_exc()
                reason = f"rank {runtime.rank}: {reason}"
            print(f"error: {reason}", file=sys.stderr, flush=True)  # a user's: as on every rank
        else:  # a consequence (a peer gone mid-collective): the cause is the first failure
            print(f"error: stopping: {store.get(FAILURE_KEY).decode()}", file=sys.stderr, flush=True)
        os._exit(1)
    watching.clear()
    dist.destroy_process_group()


def store_has(store, key: str) -> bool:
    with contextlib.suppress(Exception):
        return store.check([key])
    return False


def watch_for_failure(store, watching: threading.Event):
    """fail_together's watcher. After seeing a failure it waits a little, so that a rank whose
    own error comes at the same time (every rank refusing the same flag) says its own."""
    while watching.is_set():
        if store_has(store, FAILURE_KEY):
            time.sleep(2)
            if watching.is_set():
                print(f"error: stopping: {store.get(FAILURE_KEY).decode()}", file=sys.stderr,
                      flush=True)
                os._exit(1)
        time.sleep(0.5)


def local_rank0_first(runtime: Runtime, fn):
    """fn() on each machine's first process (LOCAL_RANK 0), then on the others: what fn
    downloads into the machine's cache is fetched once per machine, not by 8 processes into
    the same file (the download also holds a lock on its file, for caches that machines
    share). If a first process fails, every rank stops, with its message."""
    first = runtime.local_rank == 0
    result = error = None
    if first:
        try:
            result = fn()
        except UserError as e:
            error = e
    if runtime.ddp:
        failed = torch.tensor([error is not None], device=runtime.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # also the barrier: the others wait here
        if failed.item() and not error:
            raise UserError("another machine's first process failed to prepare the data or "
                            "weights (its error is in its output)")
    if error:
        raise error
    return result if first else fn()


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM paper, appendix B): 6 per parameter that takes part in a
    matmul (forward 2, backward 4), plus attention's QK^T and AV, 12 * n_layer * T * n_embd.
    Over the device's peak FLOP/s, this gives MFU: the fraction of the hardware we use."""
    c = config
    matmul_params = 12 * c.n_layer * c.n_embd ** 2 + c.n_embd * c.padded_vocab_size
    return 6 * matmul_params + 12 * c.n_layer * seq_len * c.n_embd


# Datasheet FLOP/s, dense (no sparsity), of the GPUs MFU knows: (bf16/fp16, float32 as TF32;
# V100 and T4 have no TF32: their float32). Names as torch.cuda.get_device_name() gives them,
# matched as whole words and case-blind, the more specific first ("H100 NVL" before "H100").
PEAK_FLOPS = [
    ("B200", 2250e12, 1100e12), ("GH200", 989e12, 495e12), ("H200 NVL", 835e12, 418e12),
    ("H200", 989e12, 495e12), ("H100 NVL", 835e12, 418e12), ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 495e12), ("H800 PCIe", 756e12, 378e12), ("H800", 989e12, 495e12),
    ("A100", 312e12, 156e12), ("A10G", 125e12, 62.5e12), ("A10", 125e12, 62.5e12),
    ("L40S", 362e12, 183e12), ("L40", 181e12, 90.5e12), ("L4", 121e12, 60e12),
    ("RTX 6000 Ada", 364e12, 182e12), ("RTX A6000", 155e12, 77.4e12),
    ("RTX 4090", 165e12, 82.6e12), ("RTX 3090", 71e12, 35.6e12), ("V100S", 130e12, 16.4e12),
    ("V100-PCIE", 112e12, 14e12), ("V100 PCIe", 112e12, 14e12), ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12)]


def peak_flops_of(gpu_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak of a GPU named like "NVIDIA L4", for dtype; None if unknown (then the
    log has no MFU). Whole words: "L4" is not found in "L40S", nor "A10" in "A100"."""
    for name, half, single in PEAK_FLOPS:
        if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", gpu_name, re.IGNORECASE):
            return single if dtype == torch.float32 else half
    return None


def datasheet_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), dtype)


def rng_state() -> dict:
    """This process's random generators: Python's, numpy's, torch's CPU one and its GPU's."""
    np_state = np.random.get_state()
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]],
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None)


def set_rng_state(state: dict):
    # torch.set_rng_state and torch.cuda.set_rng_state take CPU ByteTensors only, which is
    # why checkpoints are always loaded onto the CPU (load_checkpoint).
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), *rest))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # this process's GPU (set_device)


def gather_rng_states(runtime: Runtime) -> list[dict]:
    """Every rank's generators, in rank order (on rank 0; the others get theirs too)."""
    if not runtime.ddp:
        return [rng_state()]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng_states(saved: list[dict], runtime: Runtime, dropout: float):
    """Each rank takes back its own generators. A checkpoint of another number of processes
    has no state for some ranks: they all keep the fresh per-rank seeds (chapter 8), which
    only dropout draws from; exact resume needs the same number of processes then."""
    if len(saved) == runtime.world_size:
        set_rng_state(saved[runtime.rank])
    elif dropout > 0:
        say(runtime, f"the checkpoint holds the random generators of {len(saved)} processes, "
                     f"this run has {runtime.world_size}: dropout's masks start afresh")


# A param group's settings are this run's, not the checkpoint's: optimizer.load_state_dict
# would bring back the saved ones. The hyperparameters come from the flags (--weight_decay,
# --muon_momentum, ... changed on --resume apply, as --max_lr and --grad_clip do: one rule for
# every flag, note_changed_flags says which), and the implementation flags (fused, foreach)
# describe this machine (a CPU checkpoint resumed on a GPU would run unfused; an unfused one
# would leave a fused optimizer's step counters on the CPU, which fused AdamW refuses). So the
# saved groups take all of ours but their parameters before loading, and torch then places
# each tensor where our flags want it.
def with_our_groups(saved: dict, optimizer) -> dict:
    groups = [{**g, **{k: v for k, v in ours.items() if k != "params"}}
              for g, ours in zip(saved["param_groups"], optimizer.param_groups)]
    return {**saved, "param_groups": groups}


# Flags that are not the run's: how this command was started.
NOT_RUN_FLAGS = ("resume", "overwrite", "command", "changed_on_resume")


def note_changed_flags(args, saved: dict, runtime: Runtime):
    """--resume with other flags than the checkpoint's: every flag is this run's from here on
    (the param groups take them: with_our_groups). They are printed, and kept with each
    resume's step in args.changed_on_resume, which the checkpoints and the model card hold."""
    old = saved.get("args") or {}
    changed = {k: [old[k], v] for k, v in vars(args).items()
               if k in old and k not in NOT_RUN_FLAGS and old[k] != v
               and not (k == "batch_size" and v == "auto")}
    args.changed_on_resume = [*old.get("changed_on_resume", []),
                              *([{"step": saved["step"], **changed}] if changed else [])]
    if changed:
        say(runtime, "flags changed since the checkpoint, used from here on: " +
            ", ".join(f"--{k} {a} -> {b}" for k, (a, b) in changed.items()))


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, model: GPT | None = None):
    """A checkpoint's optimizer state, with this machine's flags; into a sharded model's
    optimizer (--fsdp) through the parameters' names."""
    if isinstance(optimizer, MuonAndAdamW) != ("muon" in saved):
        raise UserError(f"the checkpoint was trained with --optimizer "
                        f"{'muon' if 'muon' in saved else 'adamw'}: resume with it")
    if isinstance(optimizer, MuonAndAdamW):
        saved_split = splits_qkv(saved["muon"]["param_groups"])
        if saved_split != splits_qkv(optimizer.muon.param_groups):
            raise UserError(f"the checkpoint was trained with --muon_qkv "
                            f"{'split' if saved_split else 'whole'}: resume with it")
        # the whole momentum, our groups' settings; under --fsdp, each rank keeps its rows
        optimizer.muon.load_state_dict(with_our_groups(saved["muon"], optimizer.muon))
        for p, state in optimizer.muon.state.items():
            if hasattr(p, "to_local") and "momentum_buffer" in state:
                rows, per = torch.zeros_like(p), shard_rows(p)
                rows.to_local().copy_(state["momentum_buffer"][dist.get_rank() * per:][:per])
                state["momentum_buffer"] = rows
        return load_optimizer_state(optimizer.adamw, saved["adamw"], model)
    saved = with_our_groups(saved, optimizer)
    groups = saved["param_groups"]
    if model is None or not is_sharded(model):
        return optimizer.load_state_dict(saved)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    name_of = {p: n for n, p in model.named_parameters()}
    names = [name_of[p] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {names[i]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups]}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


def load_scaler_state(scaler: torch.amp.GradScaler, saved: dict):
    # A bf16 or float32 run saves a disabled scaler's empty state, which an fp16 scaler refuses
    # to load: it then starts from its default scale, as a fresh fp16 run would.
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


FSDP_MIN_TORCH = (2, 6)  # torch.distributed.fsdp.fully_shard is public from 2.6


def torch_version() -> tuple[int, int]:
    return tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])


def prepare_for_memory(model: GPT, args, runtime: Runtime):
    """--activation_checkpointing and --fsdp, on the model before its optimizer is made."""
    if args.activation_checkpointing:
        recompute_activations(model)
    if args.fsdp:
        shard_model(model, args, runtime)


def recompute_activations(model: GPT):
    """--activation_checkpointing: a block's activations are not kept for the backward pass but
    computed again in it (torch.utils.checkpoint, non-reentrant), trading a second forward pass
    for the memory of all but each block's input. The random generators are replayed, so
    dropout draws the same masks: the same losses and gradients. Only in training (with
    gradients): evaluation and generation run the blocks as they are."""
    from torch.utils.checkpoint import checkpoint
    for block in model.transformer.h:
        def forward(x, cache=None, block_forward=block.forward):
            if cache is None and torch.is_grad_enabled():
                return checkpoint(block_forward, x, use_reentrant=False)
            return block_forward(x, cache)
        block.forward = forward  # this block's own: its parameters keep their names


def shard_model(model: GPT, args, runtime: Runtime):
    """--fsdp: FSDP2 (torch.distributed.fsdp.fully_shard), in place. Each Block is a group of its
    own, gathered just before it runs and freed after; then the root, whose group holds the
    rest: the tied wte/lm_head weight (one parameter, so one group: torch refuses a tied
    weight split over two), wpe, ln_f. Under bf16 or fp16 the blocks compute in it
    (MixedPrecisionPolicy) and gradients are reduced in float32; the weights and the optimizer
    stay float32. With --compile each block is compiled first, in place (its keys stay plain)."""
    if torch_version() < FSDP_MIN_TORCH:
        raise UserError(f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this "
                        f"is torch {torch.__version__}")
    if args.batch_size == "auto":
        raise UserError("--fsdp needs a --batch_size: auto tries micro-batches on each GPU "
                        "alone, which sharded training cannot (every step is collective)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    half = runtime.dtype if runtime.dtype != torch.float32 else None
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32 if half else None)
    for block in model.transformer.h:
        if args.compile == "on":
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    return type(model).__name__.startswith("FSDP")  # fully_shard made the model's class FSDPGPT


def model_state(model: GPT) -> dict:
    """The model's state_dict, plain keys on the CPU, whether sharded or not. Under --fsdp every
    rank must call it (a gather); rank 0 gets the tensors, the others {}."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if state:  # gathered as two tensors: tied again, else torch.save would write both
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def optimizer_state(model: GPT, optimizer) -> dict:
    """optimizer.state_dict() as an unsharded run's (state keyed by parameter number in group
    order), whether sharded or not: one checkpoint format for every mode."""
    if isinstance(optimizer, MuonAndAdamW):  # Muon's momentum gathered whole, one at a time
        muon = optimizer.muon.state_dict()
        muon["state"] = {i: {k: v.full_tensor().cpu() if hasattr(v, "full_tensor") else v
                             for k, v in s.items()} for i, s in muon["state"].items()}
        return {"muon": muon, "adamw": optimizer_state(model, optimizer.adamw)}
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    saved = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))  # keyed by parameter name; {} off rank 0
    if not saved:
        return {}
    number: dict[str, int] = {}
    groups = [{**g, "params": [number.setdefault(n, len(number)) for n in g["params"]]}
              for g in saved["param_groups"]]
    return {"state": {number[n]: s for n, s in saved["state"].items()}, "param_groups": groups}


def load_model_state(model: GPT, saved: dict):
    if not is_sharded(model):
        return model.load_state_dict(saved)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True))


def evaluation_model(model: GPT, runtime: Runtime) -> GPT:
    """The model evaluation and generation run: the training model itself, or under --fsdp a
    plain copy on each GPU, gathered for this evaluation (whose every call would otherwise be
    a collective that all ranks must make alike, which per-rank shares and rank 0's samples
    are not)."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    copy = GPT(model.config).to(runtime.device)
    full["lm_head.weight"] = full["transformer.wte.weight"]
    copy.load_state_dict(full)
    return copy.train(model.training)


MUON_MIN_TORCH = (2, 9)  # torch.optim.Muon


def muon_settings(args) -> dict | None:
    """--optimizer muon's settings for configure_optimizer; None for AdamW alone."""
    if args.optimizer != "muon":
        return None
    if torch_version() < MUON_MIN_TORCH:
        raise UserError(f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch "
                        f"{torch.__version__}")
    return dict(muon_lr=args.muon_lr, momentum=args.muon_momentum,
                weight_decay=args.muon_weight_decay, split_qkv=args.muon_qkv == "split")


class MuonAndAdamW:
    """torch.optim.Muon for the blocks' matrices, AdamW for the rest, driven as one optimizer:
    one step, one zero_grad, their param_groups side by side (which is all GradScaler and the
    training loop touch), and one state_dict holding both. Muon's groups carry lr_scale, its
    learning rate over AdamW's, so that one schedule drives both. With split_qkv the c_attn
    weights get a group of their own with "split": 3, which muon_step (below) honours. In a
    process group (share, the default) each process orthogonalizes its share of the matrices
    and sends the others the results (muon_step)."""

    def __init__(self, matrices: dict, adamw, lr: float, muon_lr: float, momentum: float,
                 weight_decay: float, split_qkv: bool, share: bool = True):
        qkv = [n for n in matrices if split_qkv and n.endswith("attn.c_attn.weight")]  # in order
        groups = [{"params": [p for n, p in matrices.items() if n not in qkv]}]
        if qkv:
            groups.append({"params": [matrices[n] for n in qkv], "split": 3})
        self.muon = torch.optim.Muon(groups, lr=muon_lr, momentum=momentum, nesterov=True,
                                     weight_decay=weight_decay)
        for group in self.muon.param_groups:
            group["lr_scale"] = muon_lr / lr
        self.adamw = adamw
        self.rank, self.world = process_group_place() if share else (0, 1)
        self.orthogonalize_s = 0.0  # the last step's Newton-Schulz, this process's CPU seconds

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self):
        on_cpu = self.muon.param_groups[0]["params"][0].device.type == "cpu"
        if on_cpu or splits_qkv(self.muon.param_groups) or self.world > 1:
            # bfloat16 matmuls are slow on most CPUs; else torch's own dtype
            dtype = torch.float32 if on_cpu else torch.bfloat16
            self.orthogonalize_s = muon_step(self.muon, dtype, self.rank, self.world)
        else:
            self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}


def process_group_place() -> tuple[int, int]:
    """(rank, world size) in the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def splits_qkv(param_groups) -> bool:
    """Whether Muon's groups (live, or a checkpoint's) orthogonalize c_attn in parts."""
    return any(group.get("split", 1) > 1 for group in param_groups)


# Muon's work, shared. Newton-Schulz is nearly all of a Muon step's time (five iterations of
# three matmuls a matrix), and every DDP process would compute the same results from the same
# gradients. So each process orthogonalizes its share of the matrices and broadcasts the
# results: the same step, 1/N of the matmuls. nanochat's distributed Muon shards the momentum
# too (a reduce-scatter of the gradients, an all-gather of the new weights); here DDP keeps the
# momentum whole on every process, so that the checkpoint keeps one format and all processes'
# weights the same bits: an owner computes exactly what one process would (the same input, the
# same kernels), and a broadcast copies bits. Under --fsdp each process holds rows of each
# matrix and of its momentum (1/N of it): the owner gathers the update's rows (dist.gather),
# orthogonalizes it whole, and scatters each process its rows back (dist.scatter). Every
# process makes the same collectives in the same order: gathers, then its own matrices'
# Newton-Schulz (the part done in parallel), then one broadcast or scatter a matrix.
#
# Who owns what: a matrix's Newton-Schulz FLOPs, (4 n^2 m + 2 n^3) per iteration for its wide
# (n, m) orientation, k times for k parts (Q, K, V: three of (C, C), not one of (3C, C)),
# dealt greedily, the most expensive first, each to the least loaded process (ties: the lower
# position, the lower rank), so every process computes the same owners from the shapes alone.

def newton_schulz_flops(shape, parts: int, steps: int) -> float:
    n, m = sorted((shape[0] // parts, shape[1]))
    return parts * steps * (4 * n * n * m + 2 * n ** 3)


def muon_owners(param_groups, world: int) -> dict:
    """Each Muon parameter's owner: the rank that orthogonalizes its update."""
    params = [(p, g.get("split", 1), g["ns_steps"]) for g in param_groups for p in g["params"]]
    cost = [newton_schulz_flops(p.shape, k, steps) for p, k, steps in params]
    load, owners = [0.0] * world, {}
    for i in sorted(range(len(params)), key=lambda i: (-cost[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += cost[i]
        owners[params[i][0]] = rank
    return owners


@torch.no_grad()
def muon_step(muon: torch.optim.Muon, dtype: torch.dtype, rank: int = 0, world: int = 1) -> float:
    """torch.optim.Muon's step (torch/optim/_muon.py, _single_tensor_muon: the momentum buffer,
    Nesterov by lerp, decoupled decay, its "original" lr adjustment), with three changes torch's
    cannot make. A group's "split": k orthogonalizes each (k*n, m) update as k row blocks of
    (n, m), as if they were k parameters: c_attn's Q, K and V (modded-nanogpt does the same;
    on the README's recipe it lowered the val loss further). The Newton-Schulz iteration
    runs in `dtype`: on CPUs without bfloat16 matrix units (most, this project's among them) a
    bfloat16 matmul runs ~16x slower than a float32 one, and a Muon step of the `small` preset
    took 37 s through torch's step, 1.1-1.5 s in float32 (docs/performance.md). And over
    `world` processes each orthogonalizes its own matrices (muon_owners) and shares them. With
    split 1 and bfloat16 this is torch's step bit for bit; with split 3, three torch parameters;
    shared, one process's step bit for bit (all tested). Returns this process's CPU seconds in
    Newton-Schulz (its wall time would count the waits for the others)."""
    todo = []  # (parameter, its group, its lr factor, its update: this rank's rows under FSDP)
    for group in muon.param_groups:
        lr, momentum = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = muon.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            p.mul_(1 - lr * group["weight_decay"])
            n, m = p.shape[0] // group.get("split", 1), p.shape[1]
            todo.append((p, group, -lr * math.sqrt(max(1, n / m)), update))
    owners = muon_owners(muon.param_groups, world)
    whole = {p: whole_update(p, update, owners[p], rank, world) for p, _, _, update in todo}
    t0 = time.process_time()
    mine = {p: orthogonalize(whole[p], group, dtype) for p, group, _, _ in todo if owners[p] == rank}
    seconds = time.process_time() - t0
    for p, _, alpha, _ in todo:
        local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor's rows, in place
        local.add_(received_update(p, mine.get(p), owners[p], rank, world, dtype), alpha=alpha)
    return seconds


def orthogonalize(update: torch.Tensor, group: dict, dtype) -> torch.Tensor:
    """The update's k row blocks (the group's "split") each orthogonalized, in `dtype`."""
    return torch.cat([newton_schulz(block, group["ns_coefficients"], group["ns_steps"],
                                    group["eps"], dtype) for block in update.chunk(group.get("split", 1))])


def shard_rows(p) -> int:
    """Rows a process holds of a matrix sharded by FSDP2 (torch.chunk's split, padded): all
    but the last ones hold this many."""
    return -(-p.shape[0] // dist.get_world_size())


def whole_update(p, update: torch.Tensor, owner: int, rank: int, world: int):
    """The matrix's whole update on its owner; None on the others under --fsdp, whose rows go
    to the owner (every rank calls this for every matrix, in order)."""
    if not hasattr(update, "to_local"):
        return update
    local = update.to_local()
    padded = local.new_zeros(shard_rows(p), *local.shape[1:])
    padded[:len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
    dist.gather(padded, gathered, dst=owner)
    return torch.cat(gathered)[:p.shape[0]] if rank == owner else None


def received_update(p, mine, owner: int, rank: int, world: int, dtype) -> torch.Tensor:
    """p's orthogonalized update (its owner's `mine`) on every rank: whole by broadcast, or
    under --fsdp this rank's rows by scatter (every rank calls this for every matrix, in
    order). Alone, `mine` itself."""
    if world == 1:
        return mine
    if not hasattr(p, "to_local"):
        out = mine if rank == owner else torch.empty(p.shape, dtype=dtype, device=p.device)
        dist.broadcast(out, src=owner)
        return out
    local, per = p.to_local(), shard_rows(p)
    chunks = None
    if rank == owner:
        padded = mine.new_zeros(per * world, *mine.shape[1:])
        padded[:len(mine)] = mine
        chunks = list(padded.chunk(world))
    out = torch.empty(per, *local.shape[1:], dtype=dtype, device=local.device)
    dist.scatter(out, chunks, src=owner)
    return out[:len(local)]


def newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float, dtype) -> torch.Tensor:
    """torch's _zeropower_via_newtonschulz in `dtype`: (n, m) -> the nearest orthogonal-ish
    matrix, computed on the wide orientation (the Gram matrix is the smaller side squared)."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(dtype).T if tall else g.to(dtype)
    x = x / x.norm().clamp(min=eps)  # not in place: for float32, to() returned g itself
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def checkpoint_path(log_dir, step: int) -> Path:
    return Path(log_dir) / f"ckpt_{step:08d}.pt"


# Only checkpoint_path's names are checkpoints: listed, rotated, held, overwritten and resumed
# from. A user's ckpt_00000004_good.pt, or a damaged one moved aside as
# ckpt_00000008.corrupt.pt, is someone else's file: never read, never deleted.
CHECKPOINT_NAME = re.compile(r"ckpt_(\d{8})\.pt")


def list_checkpoints(log_dir) -> list[Path]:
    """The checkpoints in log_dir, oldest step first."""
    return sorted(p for p in Path(log_dir).glob("ckpt_*.pt") if CHECKPOINT_NAME.fullmatch(p.name))


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(Path(path).name)[1])


def write_checkpoint(path: Path, contents: dict):
    """torch.save, atomically; a write that fails (a full disk) is one line, and the previous
    checkpoint is untouched."""
    try:
        with atomic_write(path) as f:
            torch.save(contents, f)
    except (OSError, RuntimeError) as e:  # torch's zip writer raises RuntimeError on ENOSPC
        older = [p for p in list_checkpoints(path.parent) if p != path]
        raise UserError(f"cannot write {path} ({getattr(e, 'strerror', None) or e}); the previous "
                        f"checkpoint, {older[-1] if older else 'none'}, is intact") from None


def rotate_checkpoints(path: Path, keep: int):
    """Keep the newest `keep` checkpoints up to this one; never one of a later step."""
    older = [p for p in list_checkpoints(path.parent) if checkpoint_step(p) < checkpoint_step(path)]
    for old in older[:max(0, len(older) - (keep - 1))]:
        old.unlink(missing_ok=True)


CHECKPOINT_KEYS = ("step", "model", "optimizer", "scaler", "loader", "rng", "config", "args")


def load_checkpoint(path, for_training: bool = True) -> dict:
    """A checkpoint's contents, verified, every tensor on the CPU. Never onto the run's GPU: the
    RNG states must stay CPU tensors, and load_state_dict moves weights where they belong.

    torch.load does not check the zip archive's CRCs, so a flipped byte would load as a wrong
    weight: they are checked first (reading the file once more: about a second per GB). Then
    the contents must be ours, and every tensor of the model and the optimizer finite.
    `for_training=False` (sampling, export, --init_from) needs only the model and its config.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged:
            raise UserError(f"{path}: corrupt checkpoint (the CRC of {damaged} does not match); "
                            f"move it away to resume from an older one")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except UserError:
        raise
    except Exception as e:  # zipfile and torch raise several kinds for a damaged file
        raise UserError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}); "
                        f"move it away to resume from an older one") from None
    needed = CHECKPOINT_KEYS if for_training else ("model", "config")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    if (not isinstance(state, dict) or any(k not in state for k in needed)
            or not isinstance(state["config"], dict) or set(state["config"]) != fields):
        raise UserError(f"{path}: not a checkpoint of gpt2.py (another program's, or "
                        f"damaged): expected {', '.join(needed)} and a GPT-2 config in it")
    tensors = [*state["model"].values(), *optimizer_tensors(state.get("optimizer") or {})]
    if not all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()):
        raise UserError(f"{path}: holds NaN or infinite weights; move it away to resume from "
                        f"an older one")
    return state


def load_agreed_checkpoint(log_dir, runtime: Runtime) -> tuple[Path, dict] | None:
    """The checkpoint every rank resumes from, and its contents: rank 0's newest, or None if
    rank 0 has none.

    Only rank 0 writes checkpoints. Without a filesystem shared by all machines, the other
    nodes' --log_dir may hold an older checkpoint or none: each rank resuming from its own
    newest would diverge silently, or hang in a collective until the timeout. So rank 0
    decides, every rank checks that it can read that very file, and if one cannot, all stop
    with the same line.
    """
    newest = list_checkpoints(log_dir)
    step = torch.tensor([checkpoint_step(newest[-1]) if newest else -1], device=runtime.device)
    if runtime.ddp:
        dist.broadcast(step, src=0)
    if step.item() < 0:
        return None
    path = checkpoint_path(log_dir, step.item())
    failed, state, error = torch.zeros(runtime.world_size, device=runtime.device), None, None
    try:
        state = load_checkpoint(path)
    except UserError as e:
        failed[runtime.rank], error = 1, e
    if not runtime.ddp and error:
        raise error
    all_reduce_sum(failed, runtime)
    if failed.any():
        ranks = failed.nonzero().flatten().tolist()
        raise UserError(f"cannot resume from {path}: rank(s) {ranks} cannot read it "
                        f"({error or 'missing or damaged there'}); without a shared "
                        f"filesystem, copy it to every node")
    return path, state


def load_checkpoint_model(path) -> GPT:
    """The model of a training checkpoint (on the CPU), for sampling, evaluation, export."""
    saved = load_checkpoint(path, for_training=False)
    model = GPT(GPTConfig(**saved["config"]))
    model.load_state_dict(saved["model"])
    return model


# log.jsonl's events, as read back (by --resume, plot, export's model card, the dashboards): a
# JSON object with a whole-number step, each number it holds a number. Anything else (a line a
# kill cut short, a hand edit such as {"step": "3"} or "loss": null) is left out; each line
# left out but a cut last one is named in one warning.
EVENT_NUMBERS = ("loss", "lr", "norm", "ms", "tokens_per_s", "mfu", "val_loss", "hellaswag")


def well_formed(event) -> bool:
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return (isinstance(event, dict) and isinstance(event.get("step"), int)
            and not isinstance(event["step"], bool) and event["step"] >= 0
            and all(number(event[k]) for k in EVENT_NUMBERS if k in event))


def parse_events(path: Path, lines: list[str]) -> list[tuple[str, dict]]:
    """The well-formed events of log.jsonl's lines, each with its line; a warning names the
    others."""
    kept, bad = [], []
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if well_formed(event):
            kept.append((line, event))
        elif line.strip() and not (event is None and number == len(lines)):  # not one cut short
            bad.append(number)
    if bad:
        print(f"warning: {path}: left out {len(bad)} malformed line{'s' * (len(bad) > 1)} "
              f"({', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}): each line "
              f"must be a JSON object with a whole-number step", file=sys.stderr, flush=True)
    return kept


def is_evaluation(event: dict) -> bool:
    return "loss" not in event and "config" not in event


class EventLog:
    """Each event of the run: one JSON object a line in <log_dir>/log.jsonl (rank 0 only), and
    one line on the console. A fresh run's first event is its configuration."""

    def __init__(self, args, runtime: Runtime, state: TrainState, grad_accum: int, max_steps: int,
                 stop: StopSignals):
        self.path, self.runtime, self.state = Path(args.log_dir) / "log.jsonl", runtime, state
        self.stop, self.evaluated_steps = stop, set()
        # With a fresh run's first step, what each process holds once all of it exists (a resumed
        # run keeps that event, and its log stays the uninterrupted run's).
        self.memory_logged = state.step > 0
        # MFU: the model's FLOPs per second over the hardware's peak, of every GPU together
        peak = args.peak_flops or datasheet_peak_flops(runtime.device, runtime.dtype)
        self.mfu_per_token_s = (flops_per_token(state.model.config, args.seq_len) /
                                (peak * runtime.world_size)) if peak else 0
        if runtime.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if state.step > 0 and self.path.exists():
                # A resumed run forgets what the interrupted one logged after its checkpoint:
                # it keeps the steps before it and the evaluation at it (its training step, the
                # checkpoint's step, is logged again).
                kept = [(line, e) for line, e in parse_events(self.path, self.path.read_text().splitlines())
                        if e["step"] < state.step or e["step"] == state.step and "loss" not in e]
                with atomic_write(self.path) as f:
                    f.write("".join(line + "\n" for line, _ in kept).encode())
                self.evaluated_steps = {e["step"] for _, e in kept if is_evaluation(e)}
            else:
                self.path.unlink(missing_ok=True)  # a fresh run (own_log_dir allowed it)
        say(runtime, f"{state.model.num_params():,} parameters | {runtime.world_size} x "
                     f"{runtime.device.type} {str(runtime.dtype).removeprefix('torch.')} | "
                     f"{args.total_batch_size:,} tokens/step = {args.batch_size} x "
                     f"{args.seq_len} x {grad_accum} accum x {runtime.world_size} | "
                     f"{max_steps} steps ({state.loader.steps_per_epoch} per epoch)")
        self.dashboards = Dashboards(args, runtime, state.step)  # appendix B's end
        if state.step == 0:
            self.write(step=0, model=args.init_from or args.model or "gpt2",
                       config=asdict(state.model.config), total_batch_size=args.total_batch_size,
                       world_size=runtime.world_size)

    def write(self, **event):
        if "tokens_per_s" in event and self.mfu_per_token_s:
            event["mfu"] = self.mfu_per_token_s * event["tokens_per_s"]
        if "loss" in event and not self.memory_logged:
            event["memory_mib"] = memory_per_process(self.state, self.runtime)
            self.memory_logged = True
        if is_evaluation(event):
            self.evaluated_steps.add(event["step"])
        if self.runtime.is_main:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(event) + "\n")
            except OSError as e:  # a full disk: the run stops at the step's end, saving first
                self.stop.fail(f"cannot write {self.path} ({e.strerror or e})")
            self.dashboards.write(event)  # --tensorboard, --wandb
        print_event(event, self.runtime)

    def evaluated(self, step: int) -> bool:
        """Whether log.jsonl holds the evaluation of this step (a resumed run's first may)."""
        return step in self.evaluated_steps


def print_event(event: dict, runtime: Runtime):
    if "config" in event:
        return
    if "loss" in event:
        say(runtime, f"step {event['step']:6d} | loss {event['loss']:.4f} | lr {event['lr']:.2e} "
                     f"| norm {event['norm']:.3f} | {event['ms']:.0f} ms | "
                     f"{event['tokens_per_s']:,.0f} tok/s" +
                     (f" | MFU {100 * event['mfu']:.1f}%" if "mfu" in event else ""))
        if memory := event.get("memory_mib"):
            say(runtime, "memory per process, MiB: " + " | ".join(f"{k} {v:,.1f}" for k, v in memory.items()
                                                                if v is not None))
        if "skipped" in event:
            say(runtime, f"step {event['step']} skipped (--skip_spikes): {event['skipped']}")
        return
    parts = [f"{k} {v:.4f}" for k, v in event.items() if isinstance(v, float)]
    say(runtime, f"step {event['step']:6d} | eval | " + " | ".join(parts))
    for text in event.get("samples", []):
        say(runtime, "  >", text.replace("\n", " ")[:200])


def local_mib(tensors) -> float:
    """MiB of these tensors held by this process: under FSDP each holds its shard (to_local)."""
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def optimizer_tensors(value) -> list:
    """Every tensor in an optimizer's state_dict (references, not copies), however nested."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in optimizer_tensors(v)] if isinstance(value, (list, tuple)) else []


def rusage():
    """This process's resource usage (getrusage), or None where it does not exist: Windows."""
    try:
        import resource  # Linux and macOS
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF)


def peak_memory_mib(device) -> dict:
    """The peak so far: the GPU's allocations, or this process's resident set on a CPU."""
    if device.type == "cuda":
        return {"peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20}
    usage = rusage()  # ru_maxrss is KiB on Linux, bytes on macOS
    rss = usage and usage.ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
    return {"peak_rss_mib": rss}


def memory_per_process(state: TrainState, runtime: Runtime) -> dict:
    """What this process holds after a step: parameters, gradients, optimizer state (the
    figures FSDP divides by the number of processes), and its peak memory so far: the GPU's
    allocations, or the process's resident set on a CPU (which counts everything else too)."""
    params = list(state.model.parameters())
    memory = {"parameters": local_mib(params), "gradients": local_mib(p.grad for p in params),
              "optimizer": local_mib(optimizer_tensors(state.optimizer.state_dict()))}
    return memory | {"peak": next(iter(peak_memory_mib(runtime.device).values()))}


def read_events(log_dir) -> list[dict]:
    path = Path(log_dir) / "log.jsonl"
    if not path.exists():
        raise UserError(f"no {path}: train with --log_dir {log_dir} first")
    return [event for _, event in parse_events(path, path.read_text().splitlines())]


def check_finite(loss: float, norm: float, state: TrainState, args) -> dict:
    """Stop before the optimizer applies a non-finite loss or gradient, so that no NaN weight
    is ever stepped, saved, or rotated in place of a good checkpoint. (fp16's gradient scaler
    skips a step with an inf gradient itself and lowers its scale: that is its job.) Then the
    spike guard: {} for a step to take, or what log.jsonl says of a skipped one."""
    bad = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
    if bad[0] == "gradient norm" and not math.isfinite(norm) and state.scaler.is_enabled():
        return {}
    if math.isfinite(bad[1]):
        return skip_spike(loss, norm, state.spikes, state.step, args)
    last = list_checkpoints(args.log_dir)
    raise UserError(f"{bad[0]} is {bad[1]} at step {state.step}: stopping before the optimizer "
                    f"step. Lower --max_lr or check the data; last good checkpoint: "
                    f"{last[-1] if last else 'none'}")


# The spike guard, --skip_spikes Z (llm.c's outlier detector): a step whose loss or gradient
# norm lies more than Z standard deviations above the mean of the last SPIKE_WINDOW taken
# steps' is not taken (its batch is spent, the step counted, and log.jsonl's step event says
# "skipped" and why). No step is skipped before SPIKE_WARMUP taken steps of statistics: early
# on the mean and deviation of a few steps say little, and the first steps' norms move fast.
# A skipped step's values stay out of the statistics, or one spike would widen them for the
# next. --skip_spikes_limit K skips in a row stop the run with one line: then it is the run,
# not a batch, that changed (it diverges, or the data did), and skipping would only stall it.
# The statistics are the training state's (a checkpoint holds them), so resume is exact.
SPIKE_WINDOW, SPIKE_WARMUP = 128, 32


def skip_spike(loss: float, norm: float, stats: dict, step: int, args) -> dict:
    if not args.skip_spikes:
        return {}
    values = {"loss": loss, "gradient norm": norm}
    outliers = [f"{name} {value:.4g} is {z:.1f} standard deviations above the mean "
                f"{np.mean(stats[name]):.4g} of the last {len(stats[name])} steps"
                for name, value in values.items()
                if (z := spike_z(stats.get(name, []), value)) > args.skip_spikes]
    if not outliers:
        for name, value in values.items():
            stats[name] = [*stats.get(name, []), value][-SPIKE_WINDOW:]
        stats["in_a_row"] = 0
        return {}
    stats["in_a_row"] = stats.get("in_a_row", 0) + 1
    if stats["in_a_row"] >= args.skip_spikes_limit:
        raise UserError(f"step {step}: {stats['in_a_row']} steps in a row skipped as spikes "
                        f"(--skip_spikes {args.skip_spikes}), the last as its {outliers[0]}: "
                        f"the run itself has changed; lower --max_lr, or check the data")
    return {"skipped": "; ".join(outliers)}


def spike_z(history: list[float], value: float) -> float:
    """How many standard deviations value lies above history's mean (0 while warming up)."""
    std = float(np.std(history)) if len(history) >= SPIKE_WARMUP else 0.0
    return (value - float(np.mean(history))) / std if std > 0 else 0.0


class Stopped(Exception):
    """A signal asked the run to stop; it did, after a step and its checkpoint."""

    def __init__(self, signal_name: str | None, step: int, path: Path, runtime: Runtime):
        # signal_name None: another rank got the signal (or failed to write the log)
        super().__init__(f"{signal_name or 'stop'} after step {step}: saved {path}; continue "
                         f"with --resume")
        self.code = 128 + getattr(signal, signal_name or "SIGTERM")  # the shell's convention
        self.quiet = not runtime.is_main  # one line for the run, not one per process


class StopSignals:
    """SIGTERM (what SLURM, Kubernetes and spot instances send before they kill), SIGUSR1 (a
    SLURM --signal) and Ctrl-C set a flag, read at the end of each step and between the
    batches of an evaluation; the run then writes a checkpoint and exits. The first Ctrl-C
    says so; a second stops at once. A log.jsonl that cannot be written (a full disk) stops
    the run the same way, with its error. Handlers can only be installed from the main
    thread: elsewhere (a test's thread) the run simply has none."""

    NAMES = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __enter__(self):
        self.name, self.failure, self.save, self.previous = None, None, None, {}
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if hasattr(signal, name):  # Windows has no SIGUSR1
                    number = getattr(signal, name)
                    self.previous[number] = signal.signal(number, self.received)
        return self

    def received(self, number, frame):
        if self.name == "SIGINT" and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(number).name
        if os.environ.get("RANK", "0") == "0":  # one line for the run
            said = ("Ctrl-C: stopping after this step; Ctrl-C again to quit without a checkpoint"
                    if self.name == "SIGINT" else
                    f"{self.name}: stopping after this step, with a checkpoint")
            try:  # the handler may interrupt a print: then a plain write
                print(said, flush=True)
            except RuntimeError:
                os.write(1, (said + "\n").encode())

    def fail(self, message: str):
        self.failure = self.failure or message

    def flag(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full_like(like, float(self.name is not None or self.failure is not None))

    def on_stop(self, save):
        """save() writes the checkpoint of now and returns its path, for a stop mid-evaluation."""
        self.save = save

    def check(self, runtime: Runtime):
        """Between an evaluation's batches: if a rank was asked to stop, every rank writes the
        checkpoint now and stops (torchrun kills its workers 30 s after a SIGTERM: a long
        evaluation would outlast that). One small all-reduce, the same on every rank. The
        evaluation is cut short, and not logged: --resume runs it again."""
        stopping = self.flag(torch.zeros((), device=runtime.device))
        if self.save is not None and all_reduce_sum(stopping, runtime).item() > 0:
            path = self.save()
            raise self.stopped(checkpoint_step(path), path, runtime)

    def stopped(self, step: int, path: Path, runtime: Runtime) -> Exception:
        """What the run raises once the checkpoint of `step` is written: Stopped, or the error
        that stopped it."""
        if self.failure:
            return UserError(f"{self.failure}: stopped after step {step}, saved {path}; make "
                             f"room, then continue with --resume")
        return Stopped(self.name, step, path, runtime)

    def __exit__(self, exc_type, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        if exc_type is None and self.failure:  # the end of the run, its checkpoint written
            raise UserError(f"{self.failure}: the run finished and saved its final checkpoint")


def evaluation_batches(n_seq: int, batch_size: int, stop: StopSignals | None, runtime: Runtime):
    """This rank's sequences of each batch of an evaluation of n_seq sequences: of batch_size
    * world_size sequences each, every world_size-th one this rank's. Every rank goes through
    as many batches (on the last, a rank may have none), so that a stop signal, checked before
    each, cuts it short on all ranks at once."""
    per_batch = batch_size * runtime.world_size
    for first in range(0, n_seq, per_batch):
        if stop is not None:
            stop.check(runtime)
        mine = range(first + runtime.rank, min(n_seq, first + per_batch), runtime.world_size)
        if mine:
            yield mine


def evaluation_due(step: int, args, last: bool) -> bool:
    """An evaluation at this step: the val loss's schedule, HellaSwag's and CORE's (their own,
    when not multiples of --eval_every), and the end."""
    return last or step % args.eval_every == 0 or any(
        every and step % every == 0 for every in (args.hellaswag_every, args.core_every))


def run_length(args, loader: ShardedDataLoader, state: TrainState) -> int:
    """The run's steps: --max_steps, else --num_epochs of the data. Never fewer than a resumed
    run has taken: it would train past its end for ever, rotating away what it resumed from."""
    max_steps = args.max_steps or args.num_epochs * loader.steps_per_epoch
    if state.step > max_steps:
        asked = (f"--max_steps {args.max_steps}" if args.max_steps else
                 f"--num_epochs {args.num_epochs} ({max_steps} steps)")
        raise UserError(f"{asked} is below the checkpoint's step {state.step}: that run is "
                        f"further already; resume with --max_steps {state.step} or more")
    return max_steps


def accumulation_steps(args, world_size: int) -> int:
    """Micro-batches per optimizer step, for --total_batch_size tokens a step."""
    B, T, W = args.batch_size, args.seq_len, world_size
    if args.total_batch_size % (B * T * W):
        fits = micro_batches_that_divide(args.total_batch_size, T, W)
        hint = (f"--batch_size {max(b for b in fits if b <= B) if min(fits) <= B else min(fits)} "
                f"divides it (or --batch_size auto)" if fits else
                f"--total_batch_size must be a multiple of seq_len * world_size = {T * W}")
        raise UserError(f"--total_batch_size {args.total_batch_size} is not divisible by "
                        f"batch_size * seq_len * world_size = {B} * {T} * {W} = {B * T * W}: "
                        f"{hint}")
    return args.total_batch_size // (B * T * W)


def micro_batches_that_divide(total_batch_size: int, seq_len: int, world_size: int) -> list[int]:
    """The micro-batches B for which B * seq_len * world_size divides the step, largest first."""
    sequences, left = divmod(total_batch_size, seq_len * world_size)  # per process, per step
    return [] if left else [b for b in range(sequences, 0, -1) if sequences % b == 0]


def batch_size_or_auto(text: str):
    return "auto" if text == "auto" else int_at_least(1)(text)


def fitting_batch_size(train_model: nn.Module, args, runtime: Runtime) -> int:
    """--batch_size auto: the largest micro-batch that divides the step and fits this device
    (tried for real: a forward and backward pass), the smallest over all ranks, so that every
    rank runs the same split. --total_batch_size is kept by accumulation: the same run."""
    candidates = [b for b in micro_batches_that_divide(args.total_batch_size, args.seq_len,
                                                       runtime.world_size)
                  if b * args.seq_len <= 2 ** 16]  # 64 x 1024 tokens: more gains little
    chosen = next((b for b in candidates if micro_batch_fits(train_model, b, args, runtime)), 0)
    chosen = smallest_over_ranks(chosen, runtime)
    if chosen == 0:
        raise UserError(f"the model does not fit this {runtime.device.type} even at "
                        f"--batch_size 1 with --seq_len {args.seq_len}: use a smaller model, a "
                        f"shorter --seq_len, or a GPU with more memory")
    say(runtime, f"--batch_size auto: {chosen} sequences per micro-batch")
    return chosen


def smallest_over_ranks(value: int, runtime: Runtime) -> int:
    if not runtime.ddp:
        return value
    t = torch.tensor([value], device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def micro_batch_fits(train_model: nn.Module, batch_size: int, args, runtime: Runtime) -> bool:
    """Whether training at this micro-batch fits the GPU: one forward and backward pass on
    random tokens, its peak memory plus AdamW's moments (made at the first step: 8 bytes per
    parameter) within 90% of the GPU. The random generators and the gradients are left as
    they were. On a CPU or a Mac, where memory is the system's: at most 8 sequences."""
    if runtime.device.type != "cuda":
        return batch_size <= 8
    parameters = [p for p in train_model.parameters() if p.requires_grad]
    moments = 8 * sum(p.numel() for p in parameters)
    idx = torch.randint(0, VOCAB_SIZE, (batch_size, args.seq_len), device=runtime.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(runtime.device)
    try:
        with torch.random.fork_rng(devices=[runtime.device]):
            with autocast_context(runtime):
                _, loss = train_model(idx, idx, loss_chunk=args.loss_chunk)
            loss.backward()
        peak = torch.cuda.max_memory_allocated(runtime.device)
    except torch.cuda.OutOfMemoryError:
        peak = math.inf
    finally:
        loss = None
        for p in parameters:
            p.grad = None
        torch.cuda.empty_cache()
    return peak + moments <= 0.9 * torch.cuda.get_device_properties(runtime.device).total_memory


def model_config(args) -> GPTConfig:
    return GPTConfig.from_preset(args.model or "gpt2", n_layer=args.n_layer, n_head=args.n_head,
                                 n_embd=args.n_embd, block_size=args.block_size,
                                 pad_vocab_to_multiple_of=args.pad_vocab_to_multiple_of,
                                 dropout=args.dropout)


def refuse_size_flags(args):
    if args.model or args.n_layer or args.n_head or args.n_embd:
        raise UserError("--init_from takes the architecture from its source: drop --model, "
                        "--n_layer, --n_head and --n_embd")


def finetune_model(source: GPT, block_size: int | None, pad_vocab_to_multiple_of: int,
                   dropout: float, name: str) -> GPT:
    """The model a fine-tune starts from: the source's weights and architecture, its position
    table cropped to block_size if that is smaller (nanoGPT's crop: a shorter context uses only
    the first rows), the vocabulary padded as training wants (an export cuts it back), and
    this run's dropout."""
    c = source.config
    block_size = block_size or c.block_size
    if block_size > c.block_size:
        raise UserError(f"--block_size {block_size} > {name}'s {c.block_size}: its position "
                        f"table has no rows to extend it with")
    model = GPT(GPTConfig(block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd,
                          pad_vocab_to_multiple_of, dropout))
    state = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}  # tied
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:c.vocab_size]
    load_weights(model, state, name)
    return model


def pretrained_for_training(args) -> GPT:
    """--init_from's model: OpenAI's weights (a hub name or a save_pretrained folder) or a
    ckpt_*.pt of ours, weights only, shaped by finetune_model."""
    source = (load_checkpoint_model(args.init_from) if args.init_from.endswith(".pt")
              else load_pretrained(args.init_from))
    return finetune_model(source, args.block_size, args.pad_vocab_to_multiple_of, args.dropout,
                          args.init_from)


def finetune_config(args, saved: dict) -> GPTConfig:
    """A resumed fine-tune's architecture: its checkpoint's (the flags that shaped it must still
    agree: TrainState.load_state_dict checks)."""
    saved = GPTConfig(**saved)
    return GPTConfig(args.block_size or saved.block_size, saved.vocab_size, saved.n_layer,
                     saved.n_head, saved.n_embd, args.pad_vocab_to_multiple_of, args.dropout)


def load_hellaswag(args, runtime: Runtime):
    """HellaSwag's val examples for the training hook (None without it)."""
    return evaluation_data("HellaSwag", "--hellaswag_every", args.hellaswag_every, runtime,
                           lambda: hellaswag.load_examples(file=args.hellaswag_file,
                                                           limit=args.hellaswag_limit or None))


def load_core(args, runtime: Runtime) -> list | None:
    """CORE's tasks for the training hook (core.py; None without it)."""
    def load():
        import core  # the appendix's alone: the story needs no CORE to read
        return core.load_tasks(args.core_bundle, max_per_task=args.core_max_per_task or None)
    return evaluation_data("CORE", "--core_every", args.core_every, runtime, load)


def evaluation_data(name: str, flag: str, every: int, runtime: Runtime, load):
    """load()'s data for an evaluation in training, or None when `flag` is 0: downloaded once
    per machine (local rank 0 first), its error naming the evaluation and how to go without."""
    if not every:
        return None

    def guarded():
        try:
            return load()
        except UserError as e:
            raise UserError(f"{name} data: {e} (or train with {flag} 0)") from None
    return local_rank0_first(runtime, guarded)


def core_event(model: GPT, tasks, args, runtime: Runtime, step: int, last: bool,
               stop: StopSignals) -> dict:
    """When due, CORE and each task's centered accuracy, every rank scoring its share."""
    if not tasks or not (step % args.core_every == 0 or last):
        return {}
    import core
    stop.check(runtime)  # a signal during the evaluations before: no minutes of CORE more
    result = core.evaluate(model, tasks, runtime.device, rank=runtime.rank,
                           world_size=runtime.world_size, autocast_dtype=runtime.dtype)
    return dict(core=result["core"],
                core_tasks={label: r["centered"] for label, r in result["tasks"].items()})


# Dashboards. --tensorboard DIR and --wandb PROJECT mirror each event of log.jsonl as it is
# written, from rank 0: a training step's or an evaluation's numbers as scalars under
# log.jsonl's own names at its step, the samples as text, the config event as the run's
# configuration. log.jsonl stays the record; a mirror holds nothing it lacks. Neither package
# is a dependency: each is imported only when its flag is given, and a missing one is one line
# naming the pip command.
#
# A resumed run goes on with the same curves. Each TensorBoard writer starts with a restart
# mark at its first step (purge_step), and TensorBoard hides what earlier files hold from
# there on: what the interrupted run sent after its checkpoint, as log.jsonl forgets it (or,
# for a fresh run in a used DIR, the old run). The evaluation at the checkpoint's step, which
# log.jsonl keeps, is sent again. wandb goes on with the same run (its id kept in
# log_dir/wandb_run_id) and ignores, with a warning, the steps it already has: the same
# numbers, since resume is exact.

def dashboard_package(flag: str, name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"{flag} needs the {name} package ({e}): pip install {name}") from None


class Dashboards:
    """The run's --tensorboard and --wandb mirrors of log.jsonl (none but on rank 0); `step`:
    the step the run starts at."""

    def __init__(self, args, runtime: Runtime, step: int):
        self.tensorboard = self.wandb = self.wandb_table = None
        if not runtime.is_main:
            return
        if args.tensorboard:
            dashboard_package("--tensorboard", "tensorboard")  # torch's writer needs it
            from torch.utils.tensorboard import SummaryWriter
            try:
                self.tensorboard = SummaryWriter(args.tensorboard, purge_step=step)
            except OSError as e:
                raise UserError(f"--tensorboard {args.tensorboard}: cannot write there "
                                f"({e.strerror or e})") from None
            resumed_log = Path(args.log_dir) / "log.jsonl" if step else None
            for event in read_events(args.log_dir) if resumed_log and resumed_log.exists() else []:
                if event["step"] == step:
                    self.to_tensorboard(event)  # what purge_step hid and log.jsonl kept
        if args.wandb:
            wandb = dashboard_package("--wandb", "wandb")
            self.wandb, self.wandb_table = self.start_wandb(wandb, args, step), wandb.Table

    @staticmethod
    def start_wandb(wandb, args, step: int):
        id_file = Path(args.log_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if step and id_file.exists() else None
        try:
            run = wandb.init(project=args.wandb, config=vars(args), id=run_id,
                             resume="allow" if run_id else None,
                             dir=os.environ.get("WANDB_DIR", args.log_dir))  # beside the log
        except wandb.Error as e:
            raise UserError(f"--wandb {args.wandb}: {e} (or WANDB_MODE=offline)") from None
        with atomic_write(id_file) as f:
            f.write(run.id.encode())
        return run

    def write(self, event: dict):
        if self.tensorboard:
            self.to_tensorboard(event)
        if self.wandb:
            self.to_wandb(event)

    @staticmethod
    def scalars(event: dict) -> dict:
        return {k: v for k, v in event.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}

    def to_tensorboard(self, event: dict):
        step, board = event["step"], self.tensorboard
        if "config" in event:
            board.add_text("config", "```\n" + json.dumps(event, indent=1) + "\n```", step)
        else:
            for key, value in self.scalars(event).items():
                board.add_scalar(key, value, step)
            for i, text in enumerate(event.get("samples", [])):  # as written, not as Markdown
                board.add_text(f"samples/{i}", "```\n" + text + "\n```", step)
        board.flush()  # as it happens, not every two minutes

    def to_wandb(self, event: dict):
        if "config" in event:
            # allow_val_change: the event's "model" (the preset or source used) replaces the
            # flag's (None for the default)
            self.wandb.config.update({k: v for k, v in event.items() if k != "step"},
                                     allow_val_change=True)
            return
        data = self.scalars(event)
        if event.get("samples"):
            data["samples"] = self.wandb_table(columns=["sample"],
                                               data=[[text] for text in event["samples"]])
        self.wandb.log(data, step=event["step"])

    def __del__(self):  # the run's end: its EventLog is gone
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


# ===============================================================================================
# C. Appendix: the tools
#
# Five commands share the story's code: `sample` continues a prompt with OpenAI's weights or a
# checkpoint of ours (chapter 2's generator), `hellaswag` scores a model on HellaSwag (also
# `python hellaswag.py`), `export` hands a checkpoint to transformers, `bench` measures how fast
# all of this runs on your machine, and `plot` turns a run's log.jsonl into a picture.
# ===============================================================================================

def tool_runtime(device_flag: str, dtype_flag: str = "auto") -> Runtime:
    """One process's device and precision for the tools: bf16 autocast and TF32 where they
    pay, as in training; --device cuda:N made the current GPU (else a library's plain "cuda"
    would open a second context on GPU 0)."""
    device = pick_device(device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    enable_tf32(device)
    return Runtime(device=device, dtype=pick_dtype(dtype_flag, device))


def sample_texts(model: GPT, prompt: str, num_samples: int, max_new_tokens: int, device,
                 seed: int, top_k: int | None = 50) -> list[str]:
    """Continue prompt num_samples times (top-k 50, Hugging Face's; OpenAI's samples used 40)."""
    enc = gpt2_tokenizer()
    idx = torch.tensor([enc.encode_ordinary(prompt) or [EOT]] * num_samples, dtype=torch.long,
                       device=device)  # an empty prompt starts a fresh document
    max_new_tokens = min(max_new_tokens, model.config.block_size - idx.size(1))
    out = generate(model, idx, max_new_tokens, top_k=top_k, seed=seed)
    return [enc.decode([t for t in row.tolist() if t != EOT]) for row in out]


def load_model(args, device) -> GPT:
    """--checkpoint PATH (trained here) or --model NAME_OR_FOLDER (OpenAI's weights)."""
    model = load_checkpoint_model(args.checkpoint) if args.checkpoint else load_pretrained(args.model)
    return model.to(device).eval()


def sample(args):
    """python gpt2.py sample: continue a prompt with OpenAI's GPT-2 or a checkpoint."""
    runtime = tool_runtime(args.device)
    device = runtime.device
    model = load_model(args, device)
    enc = gpt2_tokenizer()
    # user text is plain text, "<|endoftext|>" too; an empty prompt starts a fresh document
    prompt = enc.encode_ordinary(args.prompt) or [EOT]
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    with autocast_context(runtime):
        out = generate(model, idx, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       use_cache=not args.no_cache)
    dt = time.perf_counter() - t0
    for row in out.tolist():
        print("-" * 80)
        print(enc.decode([t for t in row if t != EOT]))
    print("-" * 80)
    print(f"{args.num_samples} x {args.max_new_tokens} tokens in {dt:.2f} s "
          f"({args.num_samples * args.max_new_tokens / dt:.1f} tokens/s)", file=sys.stderr)


def hellaswag_command(args):
    """python gpt2.py hellaswag (or python hellaswag.py): score a model on HellaSwag."""
    # The data first: a bad file should fail before minutes of downloading weights.
    examples = hellaswag.load_examples(args.split, args.file, args.limit, base_url=args.base_url)
    # Training's precision: bf16 autocast on GPUs that have it, fp16 on older ones, float32
    # elsewhere. Half precision rounds the losses, so an ending that ties another to three
    # digits may flip: expect a score within a few examples of the float32 one.
    runtime = tool_runtime(args.device)
    device = runtime.device
    model = load_model(args, device)
    start = time.perf_counter()
    result = hellaswag.evaluate(model, examples, device, batch_size=args.batch_size,
                                autocast_dtype=runtime.dtype, progress=True)
    elapsed = time.perf_counter() - start
    print(f"acc      {result['acc']:.4f}  ({result['correct']}/{result['n']})")
    print(f"acc_norm {result['acc_norm']:.4f}  ({result['correct_norm']}/{result['n']})")
    print(f"n        {result['n']}")
    print(f"elapsed  {elapsed:.1f} s  ({result['n'] / elapsed:.1f} examples/s on {device})")


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
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        tie_word_embeddings=True,
        # the weights' own dtype; without it transformers guesses, and says so
        dtype=str(model.transformer.wte.weight.dtype).removeprefix("torch."))
    with atomic_write(path / "config.json") as f:
        f.write(json.dumps(hf_config, indent=2).encode())
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte
        if name == "transformer.wte.weight":
            t = t[:c.vocab_size]  # padding rows are ours alone
        tensors[name] = t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t
    write_safetensors(path / "model.safetensors", tensors)


# An export is a folder the Hugging Face tools take as they take OpenAI's gpt2: the weights
# (above), GPT-2's tokenizer in transformers' files, the generation defaults, and a model card
# that says what made the model. The tokenizer's vocab.json and merges.txt are rebuilt from
# tiktoken's encoding, the one we train with, and come out byte for byte the files OpenAI
# published (encoder.json and vocab.bpe, which the hub serves under those names): a test
# checks their sha256. No new dependency, and no download.

def byte_characters() -> list[str]:
    """The character that stands for each byte in GPT-2's files (OpenAI's bytes_to_unicode):
    the 188 printable bytes stand for themselves; the other 68 (space, control codes, ...)
    would be invisible or mangled in a text file, so they take U+0100 onwards, in order."""
    shown = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    moved = {b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in shown)}
    return [moved.get(b, chr(b)) for b in range(256)]


def merged_from(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """The two tokens whose merge made `token`: where BPE stops on its bytes with only the
    merges made before it."""
    splits = [[token[:i], token[i:]] for i in range(1, len(token))
              if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
    if len(splits) == 1:
        return splits[0]  # the only candidate: true of 45% of the tokens, and 4x faster
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:  # BPE: merge the pair made earliest, again and again
        i = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.cache  # ~2 s of Python: made once per process, however many exports it writes
def bpe_files() -> tuple[bytes, bytes]:
    """vocab.json and merges.txt, rebuilt from tiktoken's encoding. Token r >= 256 of it was
    made by merge r - 256 of merges.txt."""
    enc = gpt2_tokenizer()
    chars = byte_characters()
    text = lambda token: "".join(chars[b] for b in token)  # noqa: E731
    ranks = {enc.decode_single_token_bytes(r): r for r in range(EOT)}
    merges = [" ".join(map(text, merged_from(t, r, ranks))) for t, r in ranks.items() if len(t) > 1]
    vocab = {text(t): r for t, r in ranks.items()} | {"<|endoftext|>": EOT}
    return (json.dumps(vocab).encode(),  # OpenAI's layout, to the byte
            ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())


def tokenizer_files(block_size: int) -> dict[str, bytes]:
    """GPT-2's tokenizer as transformers' GPT2Tokenizer reads it, for contexts of block_size."""
    vocab, merges = bpe_files()
    special = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                   unk_token="<|endoftext|>")
    # Transformers' GPT-2 defaults, written out: older releases tidy " ," into "," when they
    # decode (clean_up_tokenization_spaces), and decode(encode(text)) must give back the text.
    # split_special_tokens: "<|endoftext|>" in text is plain text, as everywhere in this project
    config = dict(tokenizer_class="GPT2Tokenizer", model_max_length=block_size,
                  add_prefix_space=False, add_bos_token=False, errors="replace",
                  clean_up_tokenization_spaces=False, split_special_tokens=True, **special)
    as_json = lambda d: json.dumps(d, indent=2).encode()  # noqa: E731
    return {"vocab.json": vocab, "merges.txt": merges,
            "tokenizer_config.json": as_json(config),
            "special_tokens_map.json": as_json(special),
            "generation_config.json": as_json(dict(bos_token_id=EOT, eos_token_id=EOT))}


def data_description(data_dir) -> str:
    """What the shards in data_dir were made from, as far as fineweb.py's manifest says."""
    from fineweb import read_manifest  # only an export asks
    source = None
    with contextlib.suppress(UserError, OSError):  # a folder elsewhere, or not fineweb.py's
        source = (read_manifest(data_dir) or {}).get("params", {}).get("source")
    if source and "name" in source:
        return f"`{data_dir}`: FineWeb-Edu {source['name']}, tokenized by fineweb.py"
    if source and "input" in source:
        files = ", ".join(f"`{p}`" for p in source["input"])
        return f"`{data_dir}`: {files}, tokenized by fineweb.py"
    return f"`{data_dir}` (what it was made from: unknown)"


def model_card(model: GPT, saved: dict, checkpoint: Path, name: str) -> str:
    """README.md of an export: what made the model, on what data, how far it trained and how
    well it did, from the checkpoint and the run's log.jsonl beside it (when it is there)."""
    c, flags, step = model.config, saved.get("args") or {}, saved.get("step")
    params = model.num_params() - (c.padded_vocab_size - c.vocab_size) * c.n_embd  # as exported
    log = checkpoint.parent / "log.jsonl"
    events = read_events(log.parent) if log.exists() and step is not None else []

    def newest(key):  # the newest figure of these weights or earlier ones, never later ones
        found = [e for e in events if key in e and e["step"] <= step]
        return (f"{found[-1][key]:.4f} at step {found[-1]['step']:,}" if found else
                f"unknown ({log.name} beside the checkpoint has none)" if events else
                f"unknown (no {log.name} beside the checkpoint)")

    start = (f"fine-tuned from `{flags['init_from']}`" if flags.get("init_from") else
             "trained from random weights" if flags else "trained")
    steps = "unknown" if step is None else f"{step:,}" + (
        f" ({step * flags['total_batch_size']:,} tokens)" if "total_batch_size" in flags else "")
    limit, rows = flags.get("hellaswag_limit"), flags.get("hellaswag_file") or "its val split"
    rows = (f"the first {limit:,} rows of {rows}" if limit else
            f"all of {rows}" if flags.get("hellaswag_file") else "its 10,042 val rows")
    data = data_description(flags["data_dir"]) if flags.get("data_dir") else "unknown"
    shown = {k: v for k, v in flags.items() if k != "command"}
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags:", "- gpt2", "- gpt2.py",
        *(["datasets:", "- HuggingFaceFW/fineweb-edu"] if "FineWeb-Edu" in data else []),
        "---", "", f"# {name}", "",
        f"A GPT-2 language model {start} with gpt2.py, a from-scratch GPT-2 reproduction in "
        f"PyTorch, and exported from `{checkpoint.name}` by `python gpt2.py export`.", "",
        f"- Architecture: GPT-2, {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, a "
        f"{c.block_size:,}-token context, {params:,} parameters; GPT-2's tokenizer "
        f"({c.vocab_size:,} tokens)",
        f"- Data: {data}",
        f"- Steps: {steps}",
        f"- Validation loss: {newest('val_loss')}",
        f"- HellaSwag acc_norm (completion style, {rows}): {newest('hellaswag')}", "",
        "## Use", "", "```python", "from transformers import pipeline", "",
        f'generate = pipeline("text-generation", model="{name}")',
        'print(generate("Hello, I\'m a language model,", max_new_tokens=32)[0]["generated_text"])',
        "```", "", "Benchmarks, with EleutherAI's lm-evaluation-harness:", "", "```",
        f"lm_eval --model hf --model_args pretrained={name} "
        "--tasks hellaswag,arc_easy,piqa,lambada_openai,winogrande --batch_size 16", "```", "",
        "## Training flags", "", "```json", json.dumps(shown, indent=1) if shown else "unknown",
        "```", ""])


@contextlib.contextmanager
def export_folder(out: Path):
    """A new folder beside `out` to write the export into, renamed onto `out` once complete: a
    full disk or a kill leaves the old export (or none), never half of one. An `out` that
    exists (holding only files of export's names: checked) is moved aside, then deleted."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror})") from None
    part = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    part.mkdir()
    try:
        yield part
        old = part.with_suffix(".old") if out.exists() else None
        if old:
            os.replace(out, old)
        os.replace(part, out)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def export(args):
    """python gpt2.py export: a checkpoint of ours as a Hugging Face GPT-2 folder: the weights,
    the tokenizer, the generation defaults and a model card."""
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    saved = load_checkpoint(checkpoint, for_training=False)  # its step and flags: the card's
    model = GPT(GPTConfig(**saved["config"]))
    model.load_state_dict(saved["model"])
    files = tokenizer_files(model.config.block_size)  # offline without tiktoken's files: stop here
    files["README.md"] = model_card(model, saved, checkpoint, out.resolve().name).encode()
    # A folder with other files (an old tokenizer.json, pytorch_model.bin) would be read by
    # transformers before ours: refused, and nothing of it deleted.
    ours = {"config.json", "model.safetensors", *files}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if others:
        raise UserError(f"--out {out} holds files export does not write ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}), which transformers would read "
                        f"instead of ours: give an empty or new folder")
    with export_folder(out) as folder:
        save_pretrained(model, folder)
        for name, data in files.items():
            with atomic_write(folder / name) as f:
                f.write(data)
    print(f"wrote {out}: transformers.pipeline('text-generation', model={str(out)!r}); "
          f"also gpt2.py sample --model {out}")


# `bench` measures, in one process, everything that decides how fast training goes: the
# device's own matmul speed (the ceiling), one training step split into its parts, generation
# with and without the cache, the loader, and peak memory. MFU is the model's FLOPs per second
# over that ceiling. Medians over repetitions, with the spread, since shared machines are noisy.

def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device) -> float:
    """Seconds fn() takes, waiting for the GPU to finish its queued work."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def measure(fn, device, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    return [timed(fn, device) for _ in range(reps)]


def matmul_peak_flops(device, dtype, reps: int) -> float:
    """FLOP/s of a large square matmul in the training dtype: what this device can do at best."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / float(np.median(measure(lambda: a @ b, device, reps)))


def bench_train_step(model, train_model, optimizer, args, runtime) -> tuple[dict, float]:
    """Seconds of forward, backward and optimizer, per repetition, on random tokens; and the
    page faults per step."""
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, VOCAB_SIZE, (B, T), device=runtime.device)
    y = torch.randint(0, VOCAB_SIZE, (B, T), device=runtime.device)
    parts = {"forward": [], "backward": [], "optimizer": []}
    loss = None

    def forward():
        nonlocal loss
        with autocast_context(runtime):
            _, loss = train_model(x, y, loss_chunk=args.loss_chunk)

    for rep in range(args.warmup + args.reps):
        if rep == args.warmup:
            faults = page_faults()
        times = [timed(forward, runtime.device), timed(lambda: loss.backward(), runtime.device),
                 timed(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)),
                       runtime.device)]
        if rep >= args.warmup:
            for name, t in zip(parts, times):
                parts[name].append(t)
    # Minor page faults per step: memory the allocator gave back to the OS and takes again.
    return parts, (page_faults() - faults) / args.reps


def kept_for_backward_mib(model: GPT, forward) -> float:
    """MiB of the tensors one forward pass keeps for the backward pass, the weights left out:
    the activations, which --activation_checkpointing trades for a second forward."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()  # views of one storage count once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values()) / 2 ** 20


def page_faults() -> int:
    """This process's page faults so far (0 where getrusage does not exist: Windows)."""
    usage = rusage()
    return usage.ru_minflt if usage else 0


# The generation cases `bench` times: batch 1 and 8, greedy and top-k 50 (Hugging Face's default).
GEN_CASES = {"b1_greedy": (1, dict(temperature=0)), "b1_topk": (1, dict(top_k=50)),
             "b8_greedy": (8, dict(temperature=0)), "b8_topk": (8, dict(top_k=50))}


def bench_generation(generate_fn, runtime: Runtime, batch: int, new_tokens: int, reps: int):
    """Tokens/s of generate_fn(idx) for `batch` random 16-token prompts."""
    idx = torch.randint(0, VOCAB_SIZE, (batch, 16), device=runtime.device)
    times = measure(lambda: generate_fn(idx), runtime.device, reps, warmup=1)
    return [batch * new_tokens / t for t in times]


def transformers_twin(model: GPT, runtime: Runtime):
    """The same weights in transformers' GPT2LMHeadModel (for comparison; transformers is a
    test-only dependency, imported only for --vs_transformers)."""
    import tempfile

    import transformers
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        return transformers.GPT2LMHeadModel.from_pretrained(tmp).to(runtime.device).eval()


def generation_speeds(model: GPT, hf, runtime: Runtime, new_tokens: int, reps: int) -> dict:
    """{case: tokens/s} for ours (cached), ours without the cache, and transformers' cached
    generate on the same weights if hf is given; the cases of GEN_CASES."""
    speeds = {}
    for case, (batch, sampling) in GEN_CASES.items():
        speeds[f"gen_{case}"] = bench_generation(
            lambda idx: generate(model, idx, new_tokens, seed=0, **sampling), runtime, batch,
            new_tokens, reps)
        if hf is not None:
            hf_sampling = (dict(do_sample=False) if sampling.get("temperature") == 0
                           else dict(do_sample=True, top_k=sampling["top_k"]))
            speeds[f"gen_{case}_transformers"] = bench_generation(
                lambda idx: hf.generate(idx, attention_mask=torch.ones_like(idx),
                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        pad_token_id=EOT, **hf_sampling),
                runtime, batch, new_tokens, reps)
    speeds["gen_b1_topk_nocache"] = bench_generation(
        lambda idx: generate(model, idx, new_tokens, top_k=50, seed=0, use_cache=False),
        runtime, 1, new_tokens, reps)
    return speeds


def read_bandwidth(device: torch.device, reps: int) -> float:
    """Bytes/s this device reads: the sum of a 256 MB tensor. Generating one token at batch 1
    reads every weight once, so weight bytes / this is the fastest a token can come."""
    a = torch.ones(64 * 2 ** 20, device=device)  # 256 MB of float32
    return a.numel() * 4 / float(np.median(measure(lambda: a.sum(), device, reps)))


def hellaswag_speed(model: GPT, runtime: Runtime, n: int, reps: int) -> list[float]:
    """Examples/s of HellaSwag scoring, on the first n of the repository's 1,000 val rows."""
    examples = hellaswag.load_examples(file=Path(__file__).parent / "samples" /
                                       "hellaswag_val_1000.jsonl", limit=n)
    hellaswag.examples_per_second(model, examples[:4], runtime.device)  # warm-up
    return [hellaswag.examples_per_second(model, examples, runtime.device) for _ in range(reps)]


def core_speed(model: GPT, runtime: Runtime, n: int, reps: int) -> list[float]:
    """Examples/s of CORE scoring (core.py) on a task like CORE's hellaswag, its largest in
    tokens: the first n of the repository's 1,000 HellaSwag val rows, multiple choice, 10-shot."""
    import core
    rows = hellaswag.load_examples(file=Path(__file__).parent / "samples" /
                                   "hellaswag_val_1000.jsonl", limit=max(n, 11))
    examples = [dict(query=r["ctx"], choices=r["endings"], gold=r["label"]) for r in rows]
    task = core.Task("hellaswag", "multiple_choice", 10, " ", 25.0, examples, [""] * len(rows))
    core.examples_per_second(model, [task._replace(examples=examples[:11])], runtime.device,
                             autocast_dtype=runtime.dtype)  # warm-up
    return [core.examples_per_second(model, [task], runtime.device, autocast_dtype=runtime.dtype)
            for _ in range(reps)]


def bench_loader(reps: int, B: int = 64, T: int = 1024, shard_tokens: int = 16_000_000) -> list[float]:
    """Batches/s the loader serves at training's default B=64, T=1024: random windows of a
    32 MB shard (in the page cache, as a shard in use is). One batch must stay well under 1%
    of a GPU step (~100 ms for the 124M model on an H100)."""
    import tempfile

    import fineweb  # the shard writer (no torch inside: cheap to import)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_train_000001.bin"
        tokens = np.random.default_rng(0).integers(0, VOCAB_SIZE, shard_tokens, dtype=np.uint16)
        fineweb.write_shard(path, tokens)
        loader = ShardedDataLoader([path], B, T)
        n = 100
        return [n / t for t in measure(lambda: [loader.next_batch() for _ in range(n)],
                                       torch.device("cpu"), reps)]


def spread(values: list[float]) -> str:
    return f"{np.median(values):,.3f} (min {min(values):,.3f}, max {max(values):,.3f})"


def bench_training(model: GPT, args, runtime: Runtime) -> tuple[dict, list]:
    """The training step's figures: (results, table rows)."""
    optimizer = configure_optimizer(model, 1e-4, 0.1)
    if args.activation_checkpointing:
        recompute_activations(model)
    train_model = torch.compile(model) if args.compile == "on" else model
    peak = matmul_peak_flops(runtime.device, runtime.dtype, args.reps)
    parts, faults = bench_train_step(model, train_model, optimizer, args, runtime)
    x = torch.randint(0, VOCAB_SIZE, (args.batch_size, args.seq_len + 1), device=runtime.device)

    def forward():
        with autocast_context(runtime):
            return model(x[:, :-1], x[:, 1:], loss_chunk=args.loss_chunk)[1]

    kept = kept_for_backward_mib(model, forward)  # eager: what compiled code keeps is its own
    step = [sum(ts) for ts in zip(*parts.values())]
    tok_s = [args.batch_size * args.seq_len / t for t in step]
    flops = flops_per_token(model.config, args.seq_len)
    result = dict(device=str(runtime.device), dtype=str(runtime.dtype).removeprefix("torch."),
                  params=model.num_params(), batch_size=args.batch_size, seq_len=args.seq_len,
                  train_tok_s=float(np.median(tok_s)), peak_flops=peak,
                  mfu=flops * float(np.median(tok_s)) / peak)
    rows = [("device", f"{runtime.device} ({result['dtype']}), torch {torch.__version__}"),
            ("model", f"{result['params']:,} parameters, {flops / 1e6:,.1f} MFLOP/token"),
            ("matmul peak", f"{peak / 1e9:,.1f} GFLOP/s"),
            *[(f"{name} (s)", spread(ts)) for name, ts in parts.items()],
            ("train step (s)", spread(step)), ("train tokens/s", spread(tok_s)),
            ("MFU (of measured peak)", f"{100 * result['mfu']:.1f}%"),
            ("page faults per step", f"{faults:,.0f}"),
            ("kept for backward, weights aside (MiB)", f"{kept:,.1f}")]
    result["page_faults_per_step"], result["kept_for_backward_mib"] = faults, kept
    datasheet = datasheet_peak_flops(runtime.device, runtime.dtype)
    if datasheet:
        result["mfu_datasheet"] = flops * result["train_tok_s"] / datasheet
        rows.append(("MFU (of datasheet)", f"{100 * result['mfu_datasheet']:.1f}%"))
    for name, seconds in optimizer_step_times(model, runtime, args.reps).items():
        result[f"opt_step_{name}_s"] = float(np.median(seconds))
        rows.append((f"optimizer step, {name} (s)", spread(seconds)))
    return result, rows


def optimizer_step_times(model: GPT, runtime: Runtime, reps: int) -> dict[str, list[float]]:
    """Seconds of one optimizer step, AdamW alone and Muon (the blocks' matrices) + AdamW, on
    the same random gradients, one after the other in this process; over several processes
    (bench under torchrun) also Muon shared over them. On a CPU also the Muon steps' CPU
    seconds in Newton-Schulz (`..._newton_schulz_cpu`), this process's share of the work. (The
    weights move a little: what bench measures after this is speed, which does not depend on
    them.)"""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {"adamw": configure_optimizer(model, 1e-4, 0.1)}
    if torch_version() >= MUON_MIN_TORCH:
        muon = dict(muon_lr=0.02, momentum=0.95, weight_decay=0.0, split_qkv=True)
        optimizers["muon"] = configure_optimizer(model, 1e-4, 0.1, {**muon, "share": False})
        if runtime.world_size > 1:
            optimizers[f"muon_shared_over_{runtime.world_size}"] = configure_optimizer(
                model, 1e-4, 0.1, muon)
    times = {}
    for name, optimizer in optimizers.items():
        newton_schulz_s = []

        def step():
            optimizer.step()
            newton_schulz_s.append(getattr(optimizer, "orthogonalize_s", None))

        times[name] = measure(step, runtime.device, reps)
        if name != "adamw" and runtime.device.type == "cpu":
            times[f"{name}_newton_schulz_cpu"] = newton_schulz_s[-reps:]
    return times


def bench_optimizer_per_process(args):
    """`bench` under torchrun: the optimizer step alone, timed in every process at once (the
    rest of bench is one process's business): each rank's medians, printed by rank 0."""
    runtime = setup_distributed(args.device, args.dtype, backend=args.dist_backend)
    torch.manual_seed(0)  # the same weights and gradients in every process
    model = GPT(model_config(args)).to(runtime.device)
    medians = {k: float(np.median(v)) for k, v in optimizer_step_times(model, runtime, args.reps).items()}
    every = [None] * runtime.world_size
    dist.all_gather_object(every, medians)
    result = {f"opt_step_{k}_s": [m[k] for m in every] for k in medians}
    rows = [(f"optimizer step, {k} (s), rank 0 .. {runtime.world_size - 1}",
             " / ".join(f"{m[k]:.3f}" for m in every)) for k in medians]
    if runtime.is_main:
        print_bench(rows, result)
    dist.destroy_process_group()


def bench_inference(model: GPT, args, runtime: Runtime) -> tuple[dict, list]:
    """Generation, against transformers and the memory-bandwidth limit, and HellaSwag."""
    hf = transformers_twin(model, runtime) if args.vs_transformers else None
    speeds = generation_speeds(model, hf, runtime, args.gen_tokens, args.reps)
    bandwidth = read_bandwidth(runtime.device, args.reps)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hella = hellaswag_speed(model, runtime, args.hellaswag_examples, min(args.reps, 3))
    cores = core_speed(model, runtime, args.core_examples, min(args.reps, 3))
    result = {k: float(np.median(v)) for k, v in speeds.items()}
    result.update(gen_tok_s_cache=result["gen_b1_topk"],  # short names: batch-1 top-k
                  gen_tok_s_nocache=result["gen_b1_topk_nocache"],
                  read_bandwidth=bandwidth, gen_b1_limit=bandwidth / weight_bytes,
                  hellaswag_examples_s=float(np.median(hella)),
                  core_examples_s=float(np.median(cores)))
    if hf is not None:
        result["gen_tok_s_transformers"] = result["gen_b1_topk_transformers"]
    rows = [(f"generate 16+{args.gen_tokens}, {k.removeprefix('gen_')} (tok/s)", spread(v))
            for k, v in speeds.items()]
    rows += [("read bandwidth (GB/s)", f"{bandwidth / 1e9:,.1f}"),
             ("batch-1 limit: bandwidth / weight bytes (tok/s)", f"{result['gen_b1_limit']:,.1f}"),
             ("HellaSwag (examples/s)", spread(hella)),
             ("HellaSwag, all 10,042 val examples (min)",
              f"{10042 / result['hellaswag_examples_s'] / 60:,.1f}"),
             ("CORE, hellaswag 10-shot rows (examples/s)", spread(cores))]
    return result, rows


def bench(args):
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return bench_optimizer_per_process(args)
    runtime = tool_runtime(args.device, args.dtype)
    device = runtime.device
    apply_speed_settings(args, device)
    torch.manual_seed(0)
    model = GPT(model_config(args)).to(device)
    result, rows = bench_training(model, args, runtime)
    if not args.train_only:
        model.eval()
        more, more_rows = bench_inference(model, args, runtime)
        loader = bench_loader(args.reps)
        result.update(more, loader_batches_s=float(np.median(loader)))
        rows += [*more_rows, ("loader, B=64 T=1024 (batches/s)", spread(loader))]
    peak = peak_memory_mib(device)
    result.update(peak)
    rows += [(k.replace("_", " "), f"{v:,.0f}") for k, v in peak.items() if v is not None]
    print_bench(rows, result)


def print_bench(rows: list, result: dict):
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps(result))


# `plot` draws a run's log.jsonl: train and val loss, and HellaSwag, against steps and tokens.
# For the 124M model it adds OpenAI GPT-2 124M's own figures as reference lines: val loss 3.2924
# on the FineWeb-Edu val shard (measured by build-nanogpt) and HellaSwag acc_norm 0.2955
# (completion style, all 10,042 examples; build-nanogpt and llm.c), and CORE 0.1139 (nanochat's
# dev/estimate_gpt3_core.ipynb, from its base_eval.py on OpenAI's weights).
GPT2_124M_VAL_LOSS, GPT2_124M_HELLASWAG, GPT2_124M_CORE = 3.2924, 0.2955, 0.1139


def plot(args):
    import matplotlib  # imported here only: training does not need it
    matplotlib.use("Agg")  # files, no window
    import matplotlib.pyplot as plt

    events = read_events(args.log_dir)
    run = next((e for e in events if "config" in e), {})
    is_124m = run.get("config", {}).get("n_embd") == 768 and run["config"].get("n_layer") == 12
    tokens_per_step = run.get("total_batch_size")
    train = [(e["step"], e["loss"]) for e in events if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    hella = [(e["step"], e["hellaswag"]) for e in events if "hellaswag" in e]
    cores = [(e["step"], e["core"]) for e in events if "core" in e]
    if not train:
        raise UserError(f"{args.log_dir}/log.jsonl has no training steps yet")
    two = bool(hella or cores)
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(13 if two else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="val loss")
    if is_124m:
        ax.axhline(GPT2_124M_VAL_LOSS, color="r", ls="--", label="OpenAI GPT-2 124M val loss")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=f"{run.get('model', '')} loss")
    ax.set_ylim(top=min(11.5, max(l for _, l in train) + 0.2))
    if hella:
        hx = axes[0][1]
        hx.plot(*zip(*hella), "o-", ms=3, color="g", label="HellaSwag acc_norm")
        hx.axhline(0.25, color="gray", ls=":", label="chance")
        if is_124m:
            hx.axhline(GPT2_124M_HELLASWAG, color="r", ls="--", label="OpenAI GPT-2 124M")
        hx.set(xlabel="step", ylabel="accuracy", title="HellaSwag")
    if cores:  # centered: 0 is chance, on the same axes as HellaSwag's accuracy
        hx = axes[0][1]
        hx.plot(*zip(*cores), "s-", ms=3, color="m", label="CORE (centered)")
        if is_124m:
            hx.axhline(GPT2_124M_CORE, color="m", ls="--", label="OpenAI GPT-2 124M CORE")
        hx.set(xlabel="step", ylabel="accuracy; CORE", title="HellaSwag and CORE" if hella else "CORE")
    for a in fig.axes:
        a.grid(alpha=0.3)
        a.legend()
        if tokens_per_step:  # a second x-axis in tokens: comparable across batch sizes
            top = a.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / 1e6,
                                                      lambda t: t * 1e6 / tokens_per_step))
            top.set_xlabel("tokens (millions)")
    fig.tight_layout()
    out = Path(args.out or Path(args.log_dir) / "loss.png")
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=120)
    print(f"wrote {out}")


# ===============================================================================================
# D. Appendix: the command line
#
# `python gpt2.py [COMMAND] [FLAGS]`: train (the default), sample, hellaswag, export, bench,
# plot. The training run's hyperparameters are chapter 9's recipe; here are the rest.
# ===============================================================================================

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default once: argparse's "(default: X)", unless the help says
    the default in its own words (a flag whose default is None always does)."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def int_at_least(low: int, most: int | None = None):
    """An argparse type: a whole number >= low (and <= most, if given)."""
    def parse(text: str) -> int:
        value = int(text)  # a ValueError here is argparse's "invalid int value"
        if value < low or most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be at least {low}" + (
                f" and at most {most:,}" if most is not None else "") + f", got {value}")
        return value
    parse.__name__ = "int"
    return parse


def float_where(test, requirement: str):
    """An argparse type: a number that passes test(value), else `requirement` is said."""
    def parse(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value
    parse.__name__ = "float"
    return parse


positive_float = float_where(lambda v: v > 0, "above 0")
float_at_least_0 = float_where(lambda v: v >= 0, "at least 0")
fraction = float_where(lambda v: 0 <= v <= 1, "between 0 and 1")
open_fraction = float_where(lambda v: 0 < v <= 1, "above 0 and at most 1")
probability = float_where(lambda v: 0 <= v < 1, "at least 0 and below 1")


MAX_NEW_TOKENS = 100_000  # generation's bound: its output alone is 8 bytes a token a sample


def add_model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"preset: {', '.join(PRESETS)} (none = gpt2, the 124M "
                   "model)")
    g.add_argument("--n_layer", type=int_at_least(1), help="override the preset's number of blocks")
    g.add_argument("--n_head", type=int_at_least(1), help="override the preset's attention heads")
    g.add_argument("--n_embd", type=int_at_least(1), help="override the preset's width")
    g.add_argument("--block_size", type=int_at_least(1), help="longest context (default 1024, GPT-2's)")
    g.add_argument("--pad_vocab_to_multiple_of", type=int_at_least(1), default=64,
                   help="embedding rows rounded up to a multiple of this: 64 gives 50304, which "
                        "tiles evenly on GPUs (1 = no padding)")
    g.add_argument("--dropout", type=probability, default=0.0,
                   help="dropout on attention weights, residual branches and embeddings, in "
                        "training only: 0 for pretraining (build-nanogpt, nanoGPT), ~0.1 to "
                        "fine-tune on a small text (GPT-1's paper's, Hugging Face's GPT2Config)")


def add_device_flags(p):
    p.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")


def add_compile_flag(p):
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the training forward/backward: auto = on for CUDA (~2x "
                        "faster: the video's 300 -> 130 ms/step), off elsewhere; "
                        "`--compile` alone = on")


def train_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt2.py", formatter_class=HelpFormatter,
        description="Train GPT-2 (the default command). Other commands: "
                    "`gpt2.py sample --help`, `gpt2.py hellaswag --help`, `gpt2.py export "
                    "--help`, `gpt2.py bench --help`, `gpt2.py plot --help`.")
    add_recipe_flags(p)  # chapter 9
    p.add_argument("--init_from", metavar="SOURCE",
                   help="start from pretrained weights (chapter 3): gpt2 ... gpt2-xl, a "
                        "save_pretrained folder or a ckpt_*.pt of ours, with their architecture "
                        "and a fresh optimizer and schedule; to fine-tune (README): --max_lr "
                        "3e-5 --warmup_steps 0 --dropout 0.1")
    g = p.add_argument_group("data, evaluation, logs and checkpoints")
    g.add_argument("--data_dir", default="data/fineweb_edu",
                   help="folder of token shards written by fineweb.py")
    g.add_argument("--log_dir", default="log", help="log.jsonl and checkpoints go here")
    g.add_argument("--tensorboard", metavar="DIR",
                   help="also write each event of log.jsonl to TensorBoard files in DIR "
                        "(pip install tensorboard)")
    g.add_argument("--wandb", metavar="PROJECT",
                   help="also send each event of log.jsonl to this Weights & Biases project "
                        "(pip install wandb; wandb login, or WANDB_MODE=offline)")
    g.add_argument("--hellaswag_file", help="local HellaSwag jsonl (default: download val)")
    g.add_argument("--hellaswag_limit", type=int_at_least(0), default=0,
                   help="score only the first N examples (0 = all 10,042)")
    g.add_argument("--core_bundle", metavar="PATH", help="CORE's eval bundle, a folder or "
                   "eval_bundle.zip (default: download nanochat's once)")
    g.add_argument("--core_max_per_task", type=int_at_least(0), default=500,
                   help="CORE examples per task (nanochat's training default; 0 = all)")
    g.add_argument("--num_samples", type=int_at_least(0), default=4, help="samples printed at each eval")
    g.add_argument("--sample_tokens", type=int_at_least(1, MAX_NEW_TOKENS), default=32,
                   help="tokens per sample")
    g.add_argument("--sample_prompt", default="Hello, I'm a language model,",
                   help="prompt of the samples (build-nanogpt's)")
    g.add_argument("--keep_checkpoints", type=int_at_least(1), default=2,
                   help="newest checkpoints kept (a 124M one is 1.5 GB with the optimizer)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --log_dir")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --log_dir that holds a run: deletes its log.jsonl "
                        "and checkpoints (without it, such a folder is refused)")
    g = p.add_argument_group("the machine")
    add_device_flags(g)
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 autocast on GPUs that have it, float16 + loss scaling "
                        "on older GPUs, float32 on CPU and mps")
    add_compile_flag(g)
    g.add_argument("--loss_chunk", type=int_at_least(-1), default=-1,
                   help="rows per chunk of the fused loss (0 = plain cross-entropy over full "
                        "logits; -1 = auto: 256 on CPU, where it is faster and uses less memory, "
                        "0 on GPUs)")
    g.add_argument("--dist_timeout", type=positive_float, default=3600,
                   help="seconds a rank waits for the others in a collective: rank 0 writing a "
                        "gpt2-xl checkpoint (19 GB) can outlast NCCL's default 10 minutes")
    g.add_argument("--skip_spikes", type=float_at_least_0, default=0, metavar="Z",
                   help="skip an update whose loss or gradient norm is more than Z standard "
                        "deviations above the mean of the last 128 steps' (after 32 steps of "
                        "them; appendix B); 0: never")
    g.add_argument("--skip_spikes_limit", type=int_at_least(1), default=5, metavar="K",
                   help="stop after K updates in a row skipped: the run, not a batch, changed")
    g.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and AdamW's moments over the GPUs (FSDP2, "
                        "ZeRO-3): for gpt2-large and -xl on GPUs that cannot hold 16 bytes a "
                        "parameter; torch >= 2.6; needs a --batch_size")
    g.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass instead of "
                        "keeping them: less memory, ~20-30%% more compute")
    g.add_argument("--dist_backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="auto: nccl between GPUs, gloo between CPU processes; gloo also lets "
                        "several processes share one GPU (as the GPU tests do)")
    g.add_argument("--peak_flops", type=positive_float,
                   help="peak FLOP/s for MFU (default: the datasheet of known GPUs)")
    return p


def add_model_source_flags(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="gpt2",
                     help=f"OpenAI weights ({', '.join(HUB_MODELS)}) or a save_pretrained folder")
    src.add_argument("--checkpoint", help="a checkpoint written by training (ckpt_*.pt)")


def sample_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpt2.py sample",
                                formatter_class=HelpFormatter,
                                description="Sample text from OpenAI's GPT-2 or a checkpoint.")
    add_model_source_flags(p)
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    p.add_argument("--num_samples", type=int_at_least(1), default=4, help="continuations, batched")
    p.add_argument("--max_new_tokens", type=int_at_least(1, MAX_NEW_TOKENS), default=64,
                   help=f"tokens to add to each, at most {MAX_NEW_TOKENS:,}: past the model's "
                        f"context each sees only the last block_size tokens, and each costs a "
                        f"full forward pass")
    p.add_argument("--temperature", type=float_at_least_0, default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=int_at_least(1), default=50,
                   help="sample among the k likeliest tokens (50: Hugging Face's default; "
                        "OpenAI's published samples used 40)")
    p.add_argument("--top_p", type=open_fraction, help="nucleus sampling threshold (default off)")
    p.add_argument("--seed", type=int_at_least(0), help="makes the samples reproducible (default random)")
    p.add_argument("--no_cache", action="store_true", help="recompute the prefix every token")
    add_device_flags(p)
    return p


def hellaswag_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt2.py hellaswag", formatter_class=HelpFormatter,
        description="Score a GPT-2 model on HellaSwag (completion style, as build-nanogpt and "
                    "llm.c do). Prints acc, acc_norm, n, elapsed time and examples/s. "
                    "`python hellaswag.py` is the same command.")
    add_model_source_flags(p)
    hellaswag.add_data_flags(p)
    add_device_flags(p)
    return p


def export_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpt2.py export",
                                formatter_class=HelpFormatter,
                                description="Write a checkpoint as a Hugging Face GPT-2 folder: "
                                            "config.json + model.safetensors (the vocabulary "
                                            "unpadded), GPT-2's tokenizer (vocab.json, "
                                            "merges.txt, tokenizer_config.json, "
                                            "special_tokens_map.json), generation_config.json "
                                            "and a model card (README.md): transformers' "
                                            "Auto classes and pipeline load it as they load "
                                            "OpenAI's gpt2.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by training")
    p.add_argument("--out", required=True, help="the folder to write (made if need be; files "
                                                "of these names in it are replaced)")
    return p


def bench_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpt2.py bench",
                                formatter_class=HelpFormatter,
                                description="Measure training and generation speed; the last "
                                            "line printed is a JSON object of the results.")
    add_model_flags(p)
    p.add_argument("--batch_size", type=int_at_least(1), default=8, help="micro-batch B")
    p.add_argument("--seq_len", type=int_at_least(1), default=256, help="sequence length T")
    p.add_argument("--loss_chunk", type=int_at_least(-1), default=-1, help="as in training (-1 = auto)")
    p.add_argument("--reps", type=int_at_least(1), default=5, help="timed repetitions of each measurement")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed repetitions first")
    p.add_argument("--gen_tokens", type=int_at_least(1), default=128, help="tokens generated after a "
                   "16-token prompt, at batch 1 and 8")
    p.add_argument("--train_only", action="store_true",
                   help="only the training step and peak memory (e.g. to size a fine-tune)")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="as in training: time the step, and measure what it keeps, with it")
    add_device_flags(p)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="as in training")
    p.add_argument("--dist_backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="under torchrun, which times the optimizer step alone in every "
                        "process: as in training")
    add_compile_flag(p)
    p.add_argument("--hellaswag_examples", type=int_at_least(1), default=40,
                   help="HellaSwag val rows scored for its examples/s (from samples/)")
    p.add_argument("--core_examples", type=int_at_least(11), default=24,
                   help="HellaSwag val rows scored 10-shot as CORE scores them, for its examples/s")
    p.add_argument("--vs_transformers", action="store_true",
                   help="also time transformers' cached generate on the same weights "
                        "(needs requirements-dev.txt)")
    return p


def plot_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpt2.py plot",
                                formatter_class=HelpFormatter,
                                description="Plot a run's log.jsonl as a PNG.")
    p.add_argument("--log_dir", default="log", help="the run's --log_dir")
    p.add_argument("--out", help="PNG to write (default LOG_DIR/loss.png)")
    return p


COMMANDS = {"train": (train_parser, train), "sample": (sample_parser, sample),
            "hellaswag": (hellaswag_parser, hellaswag_command),
            "export": (export_parser, export),
            "bench": (bench_parser, bench), "plot": (plot_parser, plot)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    make_parser, run = COMMANDS[command]
    try:
        args = make_parser().parse_args(argv)
        args.command = command
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a full disk, a read-only folder, ...: the path and the reason
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one anywhere else
        print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Stopped as e:
        if not e.quiet:
            print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.code)


if __name__ == "__main__":
    main()
