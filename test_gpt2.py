"""Worked examples for gpt2.py: each test states one fact about the code and checks it.

The oracle is Hugging Face transformers' GPT2LMHeadModel, built from a config with random
weights (nothing is downloaded): if our model computes what GPT-2 computes, the two agree.
"""
import http.server
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
import transformers

import gpt2
from gpt2 import GPT, GPTConfig

HERE = Path(__file__).resolve().parent


def hf_model(n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=64, seed=0):
    """A random-weight transformers GPT-2, in float32 with the plain (eager) attention."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                     vocab_size=vocab_size, n_positions=n_positions)
    model = transformers.GPT2LMHeadModel(config).eval()
    # transformers initializes biases and LayerNorms to 0 and 1; random ones test more.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def random_tokens(vocab_size, shape=(2, 24), seed=1):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# -- 1. The model, against transformers ---------------------------------------------------------

@pytest.mark.parametrize("shape", [dict(n_layer=2, n_head=4, n_embd=64),
                                   dict(n_layer=3, n_head=3, n_embd=48)])  # 3 heads: not 2**k
def test_logits_match_transformers_after_save_pretrained_round_trip(tmp_path, shape):
    hf = hf_model(**shape)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = random_tokens(512)
    with torch.no_grad():
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_hub_key_layout_without_prefix_or_lm_head_loads_the_same(tmp_path):
    # The hub's gpt2/model.safetensors names tensors "h.0.attn.c_attn.weight" (no
    # "transformer."), has no lm_head, and carries the attn.bias mask buffers.
    hf = hf_model()
    hub_style = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        hub_style[name.removeprefix("transformer.")] = t.contiguous()
    hub_style["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    hf.config.save_pretrained(tmp_path)
    gpt2.write_safetensors(tmp_path / "model.safetensors", hub_style)
    ours = GPT.from_pretrained(str(tmp_path))
    idx = random_tokens(512)
    torch.testing.assert_close(ours(idx)[0], hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_our_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path):
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=64,
                       pad_vocab_to_multiple_of=96)  # padded table: 576 rows, 512 saved
    ours = GPT(config).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = random_tokens(512)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_safetensors_written_by_us_read_back_identically_in_every_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).view(2, 3), "d": torch.randn(2, 2).half()}
    gpt2.write_safetensors(tmp_path / "x.safetensors", tensors)
    back = gpt2.read_safetensors(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])


def test_124m_preset_has_124439808_parameters():
    model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_params() == 124_439_808


def test_fresh_model_loss_is_ln_vocab_on_random_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", block_size=64))
    idx = random_tokens(gpt2.VOCAB_SIZE, (4, 64))
    _, loss = model(idx, targets=random_tokens(gpt2.VOCAB_SIZE, (4, 64), seed=2))
    assert abs(loss.item() - math.log(gpt2.VOCAB_SIZE)) < 0.1


def test_chunked_loss_and_gradients_equal_the_plain_cross_entropy():
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=32,
                       pad_vocab_to_multiple_of=64)
    idx, targets = random_tokens(300, (3, 32)), random_tokens(300, (3, 32), seed=3)
    results = []
    for chunk in (0, 7):  # 0: plain; 7 rows at a time, not a divisor of 96
        torch.manual_seed(0)  # the same weights both times
        model = GPT(config)
        _, loss = model(idx, targets, loss_chunk=chunk)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, atol=1e-5, rtol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-4)


def test_padded_vocabulary_rows_are_never_scored():
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=1, n_embd=16,
                          pad_vocab_to_multiple_of=64))
    assert model.lm_head.weight.shape[0] == 128
    logits, _ = model(random_tokens(100, (1, 16)))
    assert logits.shape[-1] == 100
