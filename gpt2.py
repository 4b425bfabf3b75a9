"""GPT-2, from scratch, in one file: the model, its data, and how to train it on 1 to N GPUs.

Read it top to bottom, like a short book. Chapters 1 to 9 are the story; two short appendices
follow, and the machinery a first reader can skip lives in files named by what they hold.

    1. GPT-2             GPTConfig and presets, attention, MLP, Block, GPT. Nothing else.
    2. Generation        the key/value cache, the sampler, generate().
    3. OpenAI's weights  the name mapping and the Conv1D transpose; a fine-tune's start.
    4. The data          llm.c's token shards; a loader that draws each step's sequences from
                         all over the data, each once per epoch, for any number of processes.
    5. The machine       what torchrun gives each process, device and precision, DDP, FSDP.
    6. Optimization      AdamW's parameter groups, Muon for the blocks' matrices, the schedule.
    7. Evaluation        validation loss over a fixed token budget, samples, HellaSwag, CORE.
    8. Checkpoints       what the training state holds, and exact resume.
    9. Training          the recipe (every hyperparameter, its default and why), then the loop.
    A. Speed tricks for one device: the CPU's chunked loss, the fast sampler, a batch-1 lm_head.
    B. The model from the flags, a checkpoint or a fine-tune's source; the files of machinery.

    Below this file (it imports them): plumbing, config (the flags, typed), weights, parallel,
    shards, muon, checkpoints, training. Above it: tools (sample, hellaswag, export, bench,
    plot), cli (the flags).

    python fineweb.py && python gpt2.py    # data, then train; torchrun ... gpt2.py on N GPUs

The weights' names (wte, wpe, h, ln_1, attn.c_attn, ...) are OpenAI's and Hugging Face's.

From the video ("Let's reproduce GPT-2", build-nanogpt)? docs/video.md says what differs and
why, and where each of its pieces is here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import hellaswag
import muon
import parallel
import shards
import training
import weights
from config import TrainConfig
from plumbing import (UserError, batch_size_or_auto, float_at_least_0, fraction, gpt2_tokenizer,
                      int_at_least, positive_float, probability)


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
    def from_saved(cls, saved: dict) -> "GPTConfig":
        """A checkpoint's config: a field it predates takes its default, one we lack is refused."""
        unknown = set(saved) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"a checkpoint's model config has fields this gpt2.py lacks: "
                            f"{', '.join(sorted(unknown))} (made by a newer version?)")
        return cls(**saved)

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
# write it ourselves, weights.py). Two details make their tensors ours. OpenAI wrote the linear
# layers as "Conv1D" modules storing (in, out) matrices, the transpose of nn.Linear's
# (out, in). And the hub's files name tensors without the `transformer.` prefix that
# transformers' save_pretrained adds, and carry the causal-mask buffers `attn.bias` /
# `attn.masked_bias`, which are not weights at all.
#
# The same weights start a fine-tune (`--init_from`, chapter 8): the architecture is the
# source's, the optimizer and schedule start afresh. The way back out, save_pretrained, is
# `export`'s (tools.py).

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# What OpenAI's models are, to check what a hub or a mirror (HF_ENDPOINT) serves under their
# names (weights.py also checks the bytes of gpt2's weights, and what the hub says of each file).
HUB_ARCHITECTURES = {name: dict(PRESETS[name], block_size=1024, vocab_size=VOCAB_SIZE)
                     for name in HUB_MODELS}
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
    config_path, weights_path = weights.pretrained_files(name_or_path, HUB_ARCHITECTURES)
    model = GPT(GPTConfig(**weights.config_from_hf(config_path)))
    # copied in with every name and shape checked (wte may be padded here)
    ours = hf_state_dict_to_ours(weights.read_safetensors(weights_path))
    weights.load_weights(model, ours, str(weights_path))
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
    n = shards.shard_length(path)  # from its header, checked against the file
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=4 * HEADER_INTS, shape=(n,))


# The loader. A training sequence is a "window" of T + 1 tokens (the inputs, and the targets
# shifted by one). The video's loader reads the tokens in order, each process its own run:

class ContiguousLoader:
    def __init__(self, tokens: np.ndarray, B: int, T: int, rank: int = 0, world_size: int = 1):
        self.tokens, self.B, self.T, self.rank, self.world_size = tokens, B, T, rank, world_size
        self.position = B * T * rank

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, stride = self.B, self.T, self.B * self.T * self.world_size
        buf = torch.from_numpy(self.tokens[self.position:self.position + B * T + 1].astype(np.int64))
        self.position += stride
        if self.position + stride + 1 > len(self.tokens):  # the end of the data: start over
            self.position = B * T * self.rank
        return buf[:-1].view(B, T), buf[1:].view(B, T)  # inputs, and targets one token later


# The loader training uses draws each step's windows (a shard of n tokens holds (n - 1) // T at
# stride T) from all over the data, each once per epoch, not one contiguous run of B * T
# tokens per micro-batch (llm.c shuffles its shards and chunks, yet each micro-batch is one
# run): eight neighbouring sequences of one text are nearly one sample, and the step's gradient
# as noisy as a much smaller batch's. On Tiny Shakespeare the same model reaches a clearly
# lower val loss this way (docs/performance.md).
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
        self.windows = np.array([max(0, (shards.shard_length(f) - 1) // seq_len) for f in files])
        self.epoch_windows = int(self.windows.sum())
        if self.epoch_windows < self.step_windows:
            raise UserError(f"the train shards hold {self.epoch_windows:,} sequences of "
                            f"{seq_len + 1} tokens, fewer than one step needs "
                            f"({self.step_windows:,}): lower --total_batch_size")
        self.fingerprint = shards.data_fingerprint(self.files)  # is it the same data?
        self.step_start = self.micro = 0  # g of this step's first window; micro-step in it
        self._perm = self._tokens = None  # the window order and tokens last read, kept

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

    def read_windows(self, first: int, count: int) -> np.ndarray:
        """Windows g = first ... first + count - 1 of the endless stream: (count, T + 1) tokens."""
        shard, start = self.locate(np.arange(first, first + count))  # (count,) each
        rows = np.empty((count, self.T + 1), dtype=np.uint16)
        for s in np.unique(shard):  # almost always one shard, at most two
            here = shard == s
            rows[here] = self.shard_tokens(int(s))[start[here, None] + np.arange(self.T + 1)]
        return rows

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window g -> (its shard, the offset of its first token there), for each g.

        Window g is window k = g % epoch_windows of epoch g // epoch_windows. In that epoch's
        shard order, shard order[p] holds the windows k from ends[p] - windows[shard] up to
        ends[p] (cumulative counts), and k is its window number k - (ends[p] - windows[shard])
        in that shard's own permutation.
        """
        epoch, k = np.divmod(g, self.epoch_windows)
        shard, start = np.empty_like(g), np.empty_like(g)
        for e in np.unique(epoch):
            order = np.random.default_rng([self.seed, e]).permutation(len(self.files))
            ends = np.cumsum(self.windows[order])
            mine = np.flatnonzero(epoch == e)
            position = np.searchsorted(ends, k[mine], side="right")  # p, for each window
            for p in np.unique(position):
                here, s = mine[position == p], int(order[p])
                shard[here] = s
                start[here] = self.permutation(e, s)[k[here] - (ends[p] - self.windows[s])] * self.T
        return shard, start

    def permutation(self, epoch: int, shard: int) -> np.ndarray:
        """The order of a shard's windows in an epoch (the last one asked for, kept)."""
        if self._perm is None or self._perm[:2] != (epoch, shard):
            order = np.random.default_rng([self.seed, epoch, shard]).permutation(self.windows[shard])
            self._perm = (epoch, shard, order)
        return self._perm[2]

    def shard_tokens(self, shard: int) -> np.ndarray:
        """A shard's tokens, its ids checked when it is opened (the last one opened, kept)."""
        if self._tokens is None or self._tokens[0] != shard:
            tokens = read_shard(self.files[shard])
            shards.check_token_ids(tokens, self.files[shard], self.vocab_size)
            self._tokens = (shard, tokens)
        return self._tokens[1]

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


def training_data(cfg: TrainConfig, runtime: Runtime, position: dict | None = None):
    """The train loader (at a checkpoint's `position`, if given) and the accumulation steps."""
    # fineweb.py's shards, *train* and *val*, in name order, of a folder it finished
    train_files, _ = shards.data_files(cfg.logs.data_dir)
    B, T = cfg.resolved.batch_size, cfg.recipe.seq_len  # B: --batch_size, or what auto chose
    grad_accum = training.accumulation_steps(cfg.recipe.total_batch_size, B, T, runtime.world_size)
    loader = ShardedDataLoader(train_files, B, T, grad_accum, runtime.rank, runtime.world_size,
                               cfg.recipe.seed, vocab_size=VOCAB_SIZE)
    shards.agree_on_data(loader, cfg.logs.data_dir, runtime)  # every machine, the same shards
    if position is not None:
        loader.load_state_dict(position)
    return loader, grad_accum


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
# it runs and freed after, its gradients reduce-scattered to their owners (parallel.py).
#
# The precision: bf16 autocast on GPUs whose tensor cores have it (matmuls in bf16; weights,
# reductions and the optimizer in float32: ~2x faster than TF32), fp16 with loss scaling on
# older GPUs (bf16 would be emulated there), float32 on the CPU and Apple's mps. The edge cases
# of both choices (a launcher showing each process one GPU, a dtype this GPU would emulate) are
# parallel.py's pick_device and pick_dtype.

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


def autocast_context(runtime: Runtime):
    """Mixed precision: matmuls in runtime.dtype, weights and reductions in float32. In float32
    no context at all (hellaswag.py holds it, since it may not import us)."""
    return hellaswag.autocast(runtime.device, runtime.dtype)


def setup_distributed(device: str, dtype: str, timeout_s: float = 3600,
                      backend: str = "auto") -> Runtime:
    """Read torchrun's variables, pick this process's device and join the process group.
    timeout_s bounds how long a collective waits for the slowest rank (--dist_timeout)."""
    rank, local_rank, world_size = parallel.torchrun_variables()  # checked; None without torchrun
    dev = parallel.pick_device(device, local_rank)  # --device auto: cuda, mps, cpu
    if dev.type == "cuda":  # in one process too: else a library's "cuda" means GPU 0 (~500 MB)
        torch.cuda.set_device(dev)
    if rank is None:
        return Runtime(device=dev, dtype=parallel.pick_dtype(dtype, dev))
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    parallel.join_process_group(backend, rank, world_size, timeout_s)
    return Runtime(rank, local_rank, world_size, dev, parallel.pick_dtype(dtype, dev))


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
# (README). How it runs, its work shared over the processes: muon.py.

def configure_optimizer(model: nn.Module, lr: float, weight_decay: float,
                        muon_args: dict | None = None):
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}  # the tied weight once
    matrices = {n: named.pop(n) for n in list(named) if muon_args and n.endswith(CONV1D_WEIGHTS)}
    params = list(named.values())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8)
    try:  # one kernel for all parameters: CUDA, and CPU/MPS on recent torch
        adamw = torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        adamw = torch.optim.AdamW(groups, **kwargs)
    return muon.MuonAndAdamW(matrices, adamw, lr, **muon_args) if muon_args else adamw


# --optimizer's choices: (model, cfg) -> a torch.optim.Optimizer. A checkpoint's flags say which
# made it; resuming with another is refused (checkpoints.changed_flags).
OPTIMIZERS = {
    "adamw": lambda model, cfg: configure_optimizer(model, cfg.recipe.max_lr,
                                                    cfg.optimizer.weight_decay),
    "muon": lambda model, cfg: configure_optimizer(model, cfg.recipe.max_lr,
                                                   cfg.optimizer.weight_decay,
                                                   muon.muon_settings(cfg.optimizer))}


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
                  runtime: Runtime, loss_chunk: int,
                  stop: training.StopSignals | None = None) -> float:
    """Mean loss per token over the first val_tokens // seq_len sequences of the val shard."""
    model.eval()
    n_seq = min(val_tokens, len(tokens) - 1) // seq_len
    total = torch.zeros(2, dtype=parallel.accumulator_dtype(runtime.device), device=runtime.device)
    # This rank's sequences of each batch; a stop signal cuts it short on every rank
    for mine in training.evaluation_batches(n_seq, batch_size, stop, runtime):
        buf = torch.from_numpy(np.stack([tokens[s * seq_len:(s + 1) * seq_len + 1] for s in mine])
                               .astype(np.int64)).to(runtime.device)  # (b, T + 1)
        with autocast_context(runtime):
            _, loss = model(buf[:, :-1], buf[:, 1:], loss_chunk=loss_chunk)
        n = buf[:, 1:].numel()
        total += torch.stack([loss.to(total.dtype) * n, total.new_tensor(n)])  # [loss sum, tokens]
    parallel.all_reduce_sum(total, runtime)
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def validation_loss(model: GPT, tokens: np.ndarray, cfg: TrainConfig, runtime: Runtime,
                    stop: training.StopSignals) -> dict:
    # The chunked loss (appendix A) on GPUs too: the plain one would hold 13 GB of logits.
    return dict(val_loss=evaluate_loss(model, tokens, cfg.recipe.seq_len, cfg.resolved.batch_size,
                                       cfg.recipe.val_tokens, runtime,
                                       cfg.resolved.loss_chunk or 4096, stop))


def all_evaluations() -> list[training.Evaluation]:
    """In the order an event holds them: the key each writes in log.jsonl (and plot's and the
    model card's name for it), its schedule's flag, its data and its score of a model."""
    return [
        training.Evaluation("val_loss", "Validation loss", "eval_every", val_split, validation_loss),
        training.Evaluation("hellaswag", "HellaSwag acc_norm", "hellaswag_every",
                            training.load_hellaswag, training.hellaswag_score),
        training.Evaluation("core", "CORE (centered)", "core_every", training.load_core,
                            training.core_score),
        training.Evaluation("samples", None, "eval_every", samples_wanted, samples)]  # appendix B


def evaluate(state: TrainState, cfg: TrainConfig, runtime: Runtime, evaluations: list, last: bool,
             stop: training.StopSignals) -> dict:
    """The evaluation event of this step: each evaluation with data, when due."""
    model = parallel.evaluation_model(state.model, runtime, GPT)  # --fsdp: a plain copy
    event = dict(step=state.step)
    for evaluation, data in evaluations:  # (None: no data, it does not run)
        if data is not None and (state.step % getattr(cfg.recipe, evaluation.every) == 0 or last):
            stop.check(runtime)  # a signal during the one before: not a minute more
            event.update(evaluation.score(model, data, cfg, runtime, stop))
    return event


# -----------------------------------------------------------------------------------------------
# 8. Checkpoints
#
# A checkpoint is everything needed to continue as if nothing had happened: the weights, the
# optimizer's moments, the gradient scaler, the step, the loader's position and every random
# number generator, with the config and flags it was made with. TrainState holds exactly that.
# Rank 0 writes it (every rank's copy is the same) to a temporary file renamed into place, so a
# crash mid-write leaves the previous checkpoint whole; the newest --keep_checkpoints stay. To
# resume, every rank must load the same file, the one rank 0 chose: one call (checkpoints.py).

@dataclass
class TrainState:
    """What a checkpoint saves and restores (with the random number generators)."""
    model: GPT  # the raw model: its state_dict keys stay plain, whatever wraps it for training
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16's loss scaling; disabled (and empty) otherwise
    loader: ShardedDataLoader | None = None  # made once the micro-batch is known (chapter 9)
    step: int = 0  # optimizer steps taken
    spikes: dict = dataclasses.field(default_factory=dict)  # --skip_spikes' statistics
    changed_on_resume: list = dataclasses.field(default_factory=list)  # each resume's other flags

    def state_dict(self, cfg: TrainConfig, rng: list[dict]) -> dict:  # rng: every rank's
        # The model's and the optimizer's in one format, sharded (--fsdp) or not; the flags
        # under a version (config.py), so that a later gpt2.py still reads them.
        return dict(step=self.step, model=parallel.model_state(self.model),
                    optimizer=checkpoints.optimizer_state(self.model, self.optimizer),
                    scaler=self.scaler.state_dict(), loader=self.loader.state_dict(), rng=rng,
                    config=asdict(self.model.config), train_config=cfg.to_saved(),
                    spikes=self.spikes, changed_on_resume=self.changed_on_resume)

    def load_state_dict(self, saved: dict, source, runtime: Runtime):
        if GPTConfig.from_saved(saved["config"]) != self.model.config:
            raise UserError(f"{source} is a {saved['config']} model, not this run's "
                            f"{asdict(self.model.config)}")
        parallel.load_model_state(self.model, saved["model"])
        checkpoints.load_optimizer_state(self.optimizer, saved["optimizer"], self.model)
        checkpoints.load_scaler_state(self.scaler, saved["scaler"])
        checkpoints.restore_rng_states(saved["rng"], runtime, self.model.config.dropout)
        self.step, self.spikes = saved["step"], saved.get("spikes", {})
        self.changed_on_resume = checkpoints.changed_on_resume(saved)


def start_state(cfg: TrainConfig, runtime: Runtime):
    """Step 0's state; with --resume, the newest checkpoint's, the same file on every rank.
    Also the checkpoint's loader position (None for a fresh run), for the loader to come, the
    model as training runs it, and cfg with the micro-batch resolved (new_train_state)."""
    agreed = checkpoints.Checkpoints(cfg.logs.log_dir).agreed(runtime) if cfg.logs.resume else None
    state, train_model, cfg = new_train_state(cfg, runtime, agreed[1] if agreed else None)
    if not agreed:
        if cfg.logs.resume:
            parallel.say(runtime, f"--resume: no checkpoint in {cfg.logs.log_dir}, "
                                  f"starting from step 0")
        return state, None, train_model, cfg
    changed = checkpoints.changed_flags(cfg, agreed[1], runtime)  # printed, then used; saved
    # Into the raw model, on every rank: DDP's copy of rank 0's weights at its wrap is replaced.
    state.load_state_dict(agreed[1], agreed[0], runtime)
    state.changed_on_resume += changed
    parallel.say(runtime, f"resumed from {agreed[0]} at step {state.step}")
    return state, agreed[1]["loader"], train_model, cfg


def new_train_state(cfg: TrainConfig, runtime: Runtime, resuming: dict | None = None):
    """The state of step 0: random weights, or --init_from's; `resuming`, the checkpoint that
    will replace them, if any (a resumed fine-tune then never reads its source again). And the
    model as training runs it: compiled, on several GPUs (parallel.py); and cfg, resolved."""
    torch.manual_seed(cfg.recipe.seed)  # the same initial weights on every rank
    model = initial_model(cfg, runtime, resuming).to(runtime.device)  # appendix B
    # From here on each rank draws its own random numbers (dropout): the same masks on every
    # GPU would make a batch of n GPUs' micro-batches less random than one GPU's.
    torch.manual_seed(cfg.recipe.seed + 1 + runtime.rank)
    # DDP or FSDP, compile, --batch_size auto (appendix B): before the optimizer (FSDP's shards)
    train_model, batch_size = parallel.parallelize(model, cfg, runtime, fitting_batch_size)
    cfg = cfg.resolve(batch_size=batch_size)
    optimizer = OPTIMIZERS[cfg.optimizer.optimizer](model, cfg)  # chapter 6
    # fp16 needs loss scaling (its range is small: gradients underflow); bf16 and fp32 don't.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
    return TrainState(model, optimizer, scaler), train_model, cfg


def save_checkpoint(state: TrainState, cfg: TrainConfig, runtime: Runtime):
    """Rank 0 writes this step's checkpoint (with every rank's random generators) and drops
    this run's oldest; the other ranks go on."""
    rng = checkpoints.gather_rng_states(runtime)
    contents = state.state_dict(cfg, rng)  # on every rank: under --fsdp, gathered from all
    kept = checkpoints.Checkpoints(cfg.logs.log_dir, cfg.logs.keep_checkpoints)
    return kept.save(state.step, contents, runtime)


# -----------------------------------------------------------------------------------------------
# 9. Training
#
# First the recipe: every hyperparameter of a run, as a flag, with its default and the reason
# for it. The defaults are GPT-2 124M on FineWeb-Edu's 10B tokens, build-nanogpt's settings,
# which are GPT-3 small's: `torchrun --standalone --nproc_per_node=8 gpt2.py` runs it as is.
# (The flags that choose the machine rather than the run, and the other commands', are in
# cli.py.) They reach the run as one frozen `cfg` (config.py), by section: cfg.model, .recipe,
# .optimizer, .machine, .logs; and cfg.resolved, what the run decides for itself (auto).

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
    flag("--optimizer", choices=list(OPTIMIZERS), default="adamw",
         help="muon: Muon for the blocks' matrices, AdamW for the rest (chapter 6); the default "
              "stays GPT-3's AdamW until Muon is measured at 124M on GPUs")
    muon.add_muon_flags(flag)  # its learning rate, momentum, decay, and Q, K, V apart
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

def train(cfg: TrainConfig):
    """The whole run, in the order things happen. cfg: the flags, by section (config.py)."""
    validate(cfg)  # every refusal the flags earn, before anything starts (appendix B)
    m = cfg.machine
    runtime = setup_distributed(m.device, m.dtype, m.dist_timeout, m.dist_backend)
    # Plumbing: a rank that fails stops the others at once, with its
    # message; the run holds its --log_dir alone; SIGTERM (a cluster's notice), SIGUSR1 and
    # Ctrl-C ask it to stop after the current step, with a checkpoint.
    with (parallel.fail_together(runtime), training.own_log_dir(cfg.logs, runtime),
          training.StopSignals() as stop):
        cfg = cfg.resolve(**speed_settings(m.compile, m.loss_chunk, runtime.device))  # appendix A
        run_training(cfg, runtime, stop)


def train_step(state: TrainState, train_model: nn.Module, lr: float, grad_accum: int,
               cfg: TrainConfig, runtime: Runtime,
               stop: training.StopSignals) -> tuple[float, float, bool, dict]:
    """One optimizer step over grad_accum micro-batches: the mean loss, the gradient norm,
    whether a rank asked to stop, and what log.jsonl says of a step the spike guard skipped."""
    for group in state.optimizer.param_groups:  # Muon's groups follow the same curve, scaled
        group["lr"] = lr * group.get("lr_scale", 1.0)
    state.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=runtime.device)
    for micro in range(grad_accum):
        windows = to_device(state.loader.next_windows(), runtime.device)  # (B, T + 1): appendix A
        x, y = windows[:, :-1], windows[:, 1:]  # the targets: the inputs, one token later
        # As in the video, DDP all-reduces the gradients only on the last micro-batch, but
        # with no_sync() (entered before the forward pass, which records the intent).
        with training.no_sync_unless(micro == grad_accum - 1, train_model):
            with autocast_context(runtime):
                _, loss = train_model(x, y, loss_chunk=cfg.resolved.loss_chunk)
            # backward() adds each micro-batch's gradients to the last: divided by grad_accum,
            # their sum is the gradient of the mean loss over the step, as if one batch.
            loss = loss / grad_accum
            loss_sum += loss.detach()
            state.scaler.scale(loss).backward()
    state.scaler.unscale_(state.optimizer)  # fp16: the true gradients, before clipping
    norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.recipe.grad_clip)
    loss, norm, stopping = training.step_numbers(loss_sum, norm, stop, runtime)  # agreed, read once
    # A bad step is neither taken nor saved; an outlier (--skip_spikes) is skipped.
    if not (skipped := training.check_finite(loss, norm, state, cfg)):
        state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss, norm, stopping, skipped


def run_training(cfg: TrainConfig, runtime: Runtime, stop: training.StopSignals):
    # chapter 8; cfg comes back with --batch_size auto's micro-batch resolved
    state, position, train_model, cfg = start_state(cfg, runtime)
    state.loader, grad_accum = training_data(cfg, runtime, position)  # chapter 4
    r = cfg.recipe
    max_steps = training.run_length(r, state)  # --max_steps, or --num_epochs of the data
    evaluations = training.load_evaluations(all_evaluations(), cfg, runtime)  # chapter 7
    # log.jsonl and the console, with MFU; a fresh run's first event is its config
    log = training.EventLog(cfg, runtime, state, grad_accum, max_steps, stop)
    stop.on_stop(lambda: save_checkpoint(state, cfg, runtime))  # mid-evaluation: save at once
    while True:
        last = state.step >= max_steps
        # Once in a while, evaluate (once a step: a resumed run's log may hold this one).
        due = training.evaluation_due(state.step, evaluations, r, last)
        if due and not log.evaluated(state.step):
            log.write(**evaluate(state, cfg, runtime, evaluations, last, stop))
        if last:
            break

        # One optimizer step, timed.
        t0 = time.perf_counter()
        lr = get_lr(state.step, r.max_lr, r.max_lr * r.min_lr_ratio, r.warmup_steps, max_steps)
        loss, norm, stopping, skipped = train_step(state, train_model, lr, grad_accum, cfg,
                                                   runtime, stop)
        dt = time.perf_counter() - t0
        state.step += 1
        log.write(step=state.step - 1, loss=loss, lr=lr, norm=norm, ms=1000 * dt,
                  tokens_per_s=r.total_batch_size / dt, **skipped)

        # Once in a while, at the end, and when asked to stop, a checkpoint.
        if state.step % r.checkpoint_every == 0 or state.step == max_steps or stopping:
            path = save_checkpoint(state, cfg, runtime)
        if stopping:
            raise stop.stopped(state.step, path, runtime)


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


def speed_settings(compile: str, loss_chunk: int, device: torch.device) -> dict:
    """--compile and --loss_chunk as this device runs them (shared by training and `bench`):
    {compile: bool, loss_chunk: int}. Also TF32, on GPUs."""
    enable_tf32(device)
    if loss_chunk < 0:  # auto: the chunked loss below on CPUs; GPUs do better compiled
        loss_chunk = 256 if device.type == "cpu" else 0
    if compile == "auto":
        # The video measured 300 -> 130 ms per step on an A100 from torch.compile (build-nanogpt
        # ships it off); on a CPU it gained nothing here and costs ~20 s (docs/performance.md).
        reason = why_not_compile(device)
        compile = "off" if reason else "on"
        if reason and device.type == "cuda" and os.environ.get("RANK", "0") == "0":
            print(f"--compile auto: off, {reason}", file=sys.stderr, flush=True)
    return dict(compile=compile == "on", loss_chunk=loss_chunk)


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
        loss_sum = x.new_zeros((), dtype=parallel.accumulator_dtype(x.device))
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
    cdf = probs.to(parallel.accumulator_dtype(probs.device)).cumsum(dim=-1)  # (B, V)
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
# B. Appendix: the model from the flags, a checkpoint or a fine-tune's source
#
# What the story calls that needs the story's own names (GPT, read_shard, generate), and so
# lives beside it: the config from the flags and validate(), every refusal they earn, a
# checkpoint's model, a fine-tune's start, the largest micro-batch that fits (tried on the
# real model), the val split and the samples that chapter 7's evaluations load and take, text
# in and out of generate(). The rest of the machinery is in files named by their layer, each
# of which gpt2.py imports and none of which imports gpt2.py:
#
#   plumbing.py     no torch: the one-line error, flag types, atomic writes, locks, downloads
#   config.py       no torch: TrainConfig, the flags in frozen sections; what auto resolved
#   weights.py      safetensors by hand, the hub's files, a state dict copied in with checks
#   parallel.py     devices, torchrun, the process group, failing together, parallelize, state
#   shards.py       a data folder's shards, found, checked and agreed on by every process
#   muon.py         Muon with AdamW, its Newton-Schulz shared over the processes
#   checkpoints.py  Checkpoints (names, atomic write, rotation, verified load), RNG, optimizer
#   training.py     the log folder, log.jsonl, dashboards, stop signals, step checks, Evaluation
#
# Above gpt2.py: tools.py (sample, hellaswag, export, bench, plot) and cli.py (the flags).
# ===============================================================================================


def val_split(cfg: TrainConfig, runtime: Runtime) -> np.ndarray | None:
    """The val shard's tokens (None without one), checked to hold a sequence of --seq_len."""
    seq_len = cfg.recipe.seq_len
    val_files = shards.data_files(cfg.logs.data_dir)[1]  # fineweb.py's *val* shard
    if not val_files:
        return None
    tokens = read_shard(val_files[0])
    shards.check_token_ids(tokens, val_files[0], VOCAB_SIZE)
    if len(tokens) < seq_len + 1:
        raise UserError(f"{val_files[0]}: {len(tokens)} tokens, fewer than one sequence of "
                        f"--seq_len {seq_len} + 1: write a larger validation split "
                        f"(fineweb.py --val_size) or lower --seq_len")
    return tokens


def samples_wanted(cfg: TrainConfig, runtime: Runtime) -> int | None:
    return cfg.logs.num_samples or None  # --num_samples 0: none


def samples(model: GPT, num_samples: int, cfg: TrainConfig, runtime: Runtime, stop) -> dict:
    """Rank 0's samples from --sample_prompt, at the val loss's steps."""
    if not runtime.is_main:
        return {}
    return dict(samples=sample_texts(model, cfg.logs.sample_prompt, num_samples,
                                     cfg.logs.sample_tokens, runtime.device, cfg.recipe.seed))


def sample_texts(model: GPT, prompt: str, num_samples: int, max_new_tokens: int, device,
                 seed: int, top_k: int | None = 50) -> list[str]:
    """Continue prompt num_samples times (top-k 50, Hugging Face's; OpenAI's samples used 40)."""
    enc = gpt2_tokenizer()
    idx = torch.tensor([enc.encode_ordinary(prompt) or [EOT]] * num_samples, dtype=torch.long,
                       device=device)  # an empty prompt starts a fresh document
    max_new_tokens = min(max_new_tokens, model.config.block_size - idx.size(1))
    out = generate(model, idx, max_new_tokens, top_k=top_k, seed=seed)
    return [enc.decode([t for t in row.tolist() if t != EOT]) for row in out]


def load_checkpoint_model(path) -> GPT:
    """The model of a training checkpoint (on the CPU), for sampling, evaluation, export."""
    return checkpoint_model(checkpoints.Checkpoints.load(path, for_training=False))


def checkpoint_model(saved: dict) -> GPT:
    """The model a loaded checkpoint holds (export keeps the rest of it for the model card)."""
    model = GPT(GPTConfig.from_saved(saved["config"]))
    model.load_state_dict(saved["model"])
    return model


def fitting_batch_size(train_model: nn.Module, cfg: TrainConfig, runtime: Runtime) -> int:
    """--batch_size auto: the largest micro-batch that divides the step and fits this device
    (tried for real: a forward and backward pass), the smallest over all ranks, so that every
    rank runs the same split. --total_batch_size is kept by accumulation: the same run."""
    T = cfg.recipe.seq_len
    candidates = [b for b in training.micro_batches_that_divide(cfg.recipe.total_batch_size, T,
                                                                runtime.world_size)
                  if b * T <= 2 ** 16]  # 64 x 1024 tokens: more gains little
    chosen = next((b for b in candidates if micro_batch_fits(train_model, b, cfg, runtime)), 0)
    chosen = parallel.smallest_over_ranks(chosen, runtime)
    if chosen == 0:
        raise UserError(f"the model does not fit this {runtime.device.type} even at "
                        f"--batch_size 1 with --seq_len {T}: use a smaller model, a "
                        f"shorter --seq_len, or a GPU with more memory")
    parallel.say(runtime, f"--batch_size auto: {chosen} sequences per micro-batch")
    return chosen


def micro_batch_fits(train_model: nn.Module, batch_size: int, cfg: TrainConfig,
                     runtime: Runtime) -> bool:
    """Whether training at this micro-batch fits the GPU: one forward and backward pass on
    random tokens, its peak memory plus AdamW's moments (made at the first step: 8 bytes per
    parameter) within 90% of the GPU. The random generators and the gradients are left as
    they were. On a CPU or a Mac, where memory is the system's: at most 8 sequences."""
    if runtime.device.type != "cuda":
        return batch_size <= 8
    parameters = [p for p in train_model.parameters() if p.requires_grad]
    moments = 8 * sum(p.numel() for p in parameters)
    idx = torch.randint(0, VOCAB_SIZE, (batch_size, cfg.recipe.seq_len), device=runtime.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(runtime.device)
    try:
        with torch.random.fork_rng(devices=[runtime.device]):
            with autocast_context(runtime):
                _, loss = train_model(idx, idx, loss_chunk=cfg.resolved.loss_chunk)
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


def initial_model(cfg: TrainConfig, runtime: Runtime, resuming: dict | None) -> GPT:
    """Step 0's model: random weights of the flags' shape, or --init_from's (rank 0 of each
    machine downloads first), or the shape of the fine-tune a checkpoint resumes."""
    m = cfg.model
    if not m.init_from:
        return GPT(model_config(m))  # validate() checked its shape
    model = (GPT(finetune_config(m, resuming["config"])) if resuming
             else parallel.local_rank0_first(runtime, lambda: pretrained_for_training(m)))
    check_seq_len(cfg.recipe.seq_len, model.config.block_size)  # the source's, known now
    return model


def model_config(m) -> GPTConfig:
    """The architecture of the model flags (training's ModelConfig, or bench's flags)."""
    return GPTConfig.from_preset(m.model or "gpt2", n_layer=m.n_layer, n_head=m.n_head,
                                 n_embd=m.n_embd, block_size=m.block_size,
                                 pad_vocab_to_multiple_of=m.pad_vocab_to_multiple_of,
                                 dropout=m.dropout)


def check_seq_len(seq_len: int, block_size: int):
    if seq_len > block_size:
        raise UserError(f"--seq_len {seq_len} > --block_size {block_size}")


def validate(cfg: TrainConfig):
    """Every refusal that the flags, torch's version and the data folder earn, in one place,
    before a process group, a download or a GPU probe: each is one line. (What only the run
    can see, a checkpoint or a source model that does not fit the flags, is refused where it
    is read.)"""
    m, r = cfg.model, cfg.recipe
    shards.data_files(cfg.logs.data_dir)  # fineweb.py's finished folder
    if m.init_from and (m.model or m.n_layer or m.n_head or m.n_embd):
        raise UserError("--init_from takes the architecture from its source: drop --model, "
                        "--n_layer, --n_head and --n_embd")
    if not m.init_from:
        check_seq_len(r.seq_len, model_config(m).block_size)  # the preset and its shape, too
    elif m.block_size:
        check_seq_len(r.seq_len, m.block_size)
    if r.val_tokens < r.seq_len:
        raise UserError(f"--val_tokens {r.val_tokens} < --seq_len {r.seq_len}: not one "
                        f"validation sequence")
    # the step must split into micro-batches: at --batch_size auto, at least into ones of 1
    world_size = (parallel.torchrun_variables()[2] or 1)
    training.accumulation_steps(r.total_batch_size, 1 if r.batch_size == "auto" else r.batch_size,
                                r.seq_len, world_size)
    parallel.check_machine_flags(cfg.machine, r.batch_size)  # --fsdp's needs
    muon.muon_settings(cfg.optimizer)  # --optimizer muon's torch
    training.check_dashboard_packages(cfg.logs)  # --tensorboard's and --wandb's packages


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
    weights.load_weights(model, state, name)
    return model


def pretrained_for_training(m) -> GPT:
    """--init_from's model: OpenAI's weights (a hub name or a save_pretrained folder) or a
    ckpt_*.pt of ours, weights only, shaped by finetune_model."""
    source = (load_checkpoint_model(m.init_from) if m.init_from.endswith(".pt")
              else load_pretrained(m.init_from))
    return finetune_model(source, m.block_size, m.pad_vocab_to_multiple_of, m.dropout,
                          m.init_from)


def finetune_config(m, saved: dict) -> GPTConfig:
    """A resumed fine-tune's architecture: its checkpoint's (the flags that shaped it must still
    agree: TrainState.load_state_dict checks)."""
    saved = GPTConfig.from_saved(saved)
    return GPTConfig(m.block_size or saved.block_size, saved.vocab_size, saved.n_layer,
                     saved.n_head, saved.n_embd, m.pad_vocab_to_multiple_of, m.dropout)


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


if __name__ == "__main__":
    import cli  # the command line (cli.py) imports this file as the module gpt2: one copy

    cli.main()
