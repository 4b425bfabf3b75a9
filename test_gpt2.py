"""Worked examples for gpt2.py: each test states one fact about the code and checks it.

The oracle is Hugging Face transformers' GPT2LMHeadModel, built from a config with random
weights (nothing is downloaded): if our model computes what GPT-2 computes, the two agree.
"""
import ast
import contextlib
import dataclasses
import errno
import gc
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import weakref
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import requests
import tiktoken
import torch
import transformers

import checkpoints
import cli
import config
import fineweb
import gpt2
import muon
import parallel
import plumbing
import shards
import tools
import training
import weights
from conftest import (SHARED_RUN, TINY_RUN, assert_one_error_line, copy_run, finish, free_port,
                      run_in_background, run_script, torchrun, train_losses, wait_for_step)
from config import TrainConfig
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
    ours = gpt2.load_pretrained(str(tmp_path)).eval()
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
    weights.write_safetensors(tmp_path / "model.safetensors", hub_style)
    ours = gpt2.load_pretrained(str(tmp_path))
    idx = random_tokens(512)
    torch.testing.assert_close(ours(idx)[0], hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_our_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path):
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=64,
                       pad_vocab_to_multiple_of=96)  # padded table: 576 rows, 512 saved
    ours = GPT(config).eval()
    tools.save_pretrained(ours, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = random_tokens(512)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_safetensors_written_by_us_read_back_identically_in_every_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).view(2, 3), "d": torch.randn(2, 2).half()}
    weights.write_safetensors(tmp_path / "x.safetensors", tensors)
    back = weights.read_safetensors(tmp_path / "x.safetensors")
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


def test_given_positions_and_a_mask_two_endings_packed_after_one_context_compute_as_if_alone():
    import hellaswag
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    ctx, end1, end2 = (torch.randint(0, 50257, (n,)) for n in (6, 3, 5))
    row = torch.cat([ctx, end1, end2])[None]  # (1, 14): the context once, then both endings
    pos = torch.cat([torch.arange(6), torch.arange(6, 9), torch.arange(6, 11)])[None]  # (1, 14)
    part = torch.tensor([0] * 6 + [1] * 3 + [2] * 5)  # (14,)
    # Each token sees the earlier tokens of the context and of its own ending.
    sees = torch.ones(14, 14, dtype=torch.bool).tril() & ((part[None, :] == 0)
                                                          | (part[None, :] == part[:, None]))
    with torch.no_grad():
        packed = model.hidden(row, hellaswag.PackedRows(pos, sees[None]))[0]  # (14, C)
        alone1 = model.hidden(torch.cat([ctx, end1])[None])[0]  # (9, C)
        alone2 = model.hidden(torch.cat([ctx, end2])[None])[0]  # (11, C)
    assert torch.allclose(packed[:9], alone1, atol=1e-5)
    assert torch.allclose(packed[9:], alone2[6:], atol=1e-5)


def written_out(model, on=True):
    """The model with chapter 1's step-by-step attention instead of the fused kernel."""
    for module in model.modules():
        if isinstance(module, gpt2.CausalSelfAttention):
            module.written_out = on
    return model


def test_the_written_out_attention_equals_the_fused_kernel_with_and_without_the_cache():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=500, n_layer=2, n_head=4, n_embd=32)).eval()
    idx = random_tokens(500, (2, 20))
    fused = model(idx)[0]
    fused_tokens = gpt2.generate(model, idx[:, :5], 12, temperature=0)
    with torch.no_grad():
        fused_cached = fused_steps(model, idx)
    written_out(model)
    torch.testing.assert_close(model(idx)[0], fused, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(fused_steps(model, idx), fused_cached, atol=1e-5, rtol=0)
        torch.testing.assert_close(fused_steps(model, idx), fused[:, 8:], atol=1e-5, rtol=0)
    assert torch.equal(gpt2.generate(model, idx[:, :5], 12, temperature=0), fused_tokens)
    # several new tokens after a cached prefix: the mask aligned to the bottom-right corner
    q, k, v = (torch.randn(2, 4, n, 8, generator=torch.Generator().manual_seed(n))
               for n in (3, 7, 7))
    torch.testing.assert_close(gpt2.causal_attention(q, k, v, written_out=True),
                               gpt2.causal_attention(q, k, v), atol=1e-6, rtol=0)


def fused_steps(model, idx):
    """The logits of positions 8.. of idx, fed through the KV cache: 8 tokens, then one a step."""
    cache = gpt2.KVCache(model.config, idx.size(0), model.config.block_size)
    model.hidden(idx[:, :8], cache)
    return torch.stack([model.logits(model.hidden(idx[:, t:t + 1], cache))[:, 0]
                        for t in range(8, idx.size(1))], dim=1)


# -- 1b. Generation with the KV cache -----------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=gpt2.VOCAB_SIZE, n_layer=2, n_head=2, n_embd=32,
                       pad_vocab_to_multiple_of=64)
    return GPT(config).eval()


def test_greedy_tokens_are_identical_with_and_without_the_cache_even_past_block_size(small_model):
    prompt = random_tokens(gpt2.VOCAB_SIZE, (2, 8))
    # 8 + 40 = 48 tokens: the last 16 are predicted from a sliding 32-token window.
    cached = gpt2.generate(small_model, prompt, 40, temperature=0)
    uncached = gpt2.generate(small_model, prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :8], prompt)


def test_top_k_1_is_greedy(small_model):
    prompt = random_tokens(gpt2.VOCAB_SIZE, (2, 8))
    assert torch.equal(gpt2.generate(small_model, prompt, 12, top_k=1, seed=3),
                       gpt2.generate(small_model, prompt, 12, temperature=0))


def test_the_same_seed_gives_the_same_samples_and_another_seed_others(small_model):
    prompt = random_tokens(gpt2.VOCAB_SIZE, (2, 8))
    a = gpt2.generate(small_model, prompt, 16, seed=7)
    assert torch.equal(a, gpt2.generate(small_model, prompt, 16, seed=7))
    assert not torch.equal(a, gpt2.generate(small_model, prompt, 16, seed=8))


def test_top_k_and_top_p_never_emit_a_token_outside_their_set():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1000, generator=generator).repeat(500, 1) * 3  # 500 draws at once
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    drawn = gpt2.sample_next_token(logits, 1.0, 5, None, generator)
    assert set(drawn.tolist()) <= top5 and len(set(drawn.tolist())) > 1
    probs, order = torch.sort(torch.softmax(logits[0], -1), descending=True)
    nucleus_size = int((probs.cumsum(0) < 0.5).sum()) + 1  # smallest prefix reaching 0.5
    nucleus = set(order[:nucleus_size].tolist())
    drawn = gpt2.sample_next_token(logits, 1.0, None, 0.5, generator)
    assert set(drawn.tolist()) <= nucleus and len(set(drawn.tolist())) > 1


@pytest.mark.parametrize("fast", [True, False])  # the inverse-CDF draw, and torch.multinomial
def test_sampled_tokens_follow_the_softmax_distribution(fast):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    logits = probs.log().repeat(40_000, 1)  # 40,000 independent draws
    drawn = gpt2.sample_next_token(logits, 1.0, None, None, torch.Generator().manual_seed(0),
                                   fast=fast)
    frequencies = torch.bincount(drawn, minlength=5) / len(drawn)
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)  # ~4 standard errors
    assert frequencies[4] == 0


def test_sampling_never_emits_a_padding_id():
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=1, n_embd=16,
                          pad_vocab_to_multiple_of=64))
    with torch.no_grad():
        model.lm_head.weight[100:] = 10.0  # padding rows that would win every draw if scored
    out = gpt2.generate(model, torch.zeros(4, 1, dtype=torch.long), 12, seed=0)
    assert out.max() < 100


def test_tokenizer_works_offline():
    assert tiktoken.get_encoding("gpt2").encode("Hello world") == [15496, 995]


def test_without_the_tokenizer_files_and_offline_each_script_says_so_in_one_line(
        samples, tmp_path, run_main, monkeypatch):
    folder = tmp_path / "model"
    tools.save_pretrained(GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8)), folder)
    # fineweb.py, as a user runs it (it imports no torch: a quick process): an empty tokenizer
    # cache, and a proxy nobody listens on, so tiktoken's download fails at once.
    dead = f"http://127.0.0.1:{free_port()}"
    offline = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "HTTPS_PROXY": dead,
               "https_proxy": dead, "NO_PROXY": "", "no_proxy": ""}
    result = run_script("fineweb.py", "--input", samples / "tinyshakespeare.txt",
                        "--out_dir", tmp_path / "out", env=offline, timeout=120)
    assert_one_error_line(result, "GPT-2 tokenizer", "TIKTOKEN_CACHE_DIR")
    # The other scripts load it through the same call; here tiktoken fails as it did there.
    def offline_tiktoken(name):
        raise requests.exceptions.ProxyError(f"Unable to connect to proxy {dead}")
    monkeypatch.setattr(tiktoken, "get_encoding", offline_tiktoken)
    for args in (["hellaswag", "--model", folder, "--file", samples / "hellaswag_val_1000.jsonl"],
                 ["sample", "--model", folder, "--max_new_tokens", 2]):  # hellaswag.py runs the first
        assert_one_error_line(run_main(cli.main, *args), "GPT-2 tokenizer", "TIKTOKEN_CACHE_DIR")


# -- 1c. Downloading OpenAI's weights from the hub (a local server stands in for it) ------------

OPENAI = "/openai-community/gpt2/resolve/main/"  # where the hub keeps OpenAI's 124M GPT-2


@pytest.fixture
def hub(tmp_path, monkeypatch, local_hub):
    """A local "hub" (conftest's LocalHub) holding a small random GPT-2 under the name gpt2, its
    transformers model in `hub.hf`; HF_ENDPOINT points at it, and the cache starts empty."""
    hf = hf_model()
    hf.save_pretrained(tmp_path / "gpt2")
    hub = local_hub({p.name: p.read_bytes() for p in (tmp_path / "gpt2").iterdir()}, root=OPENAI)
    hub.hf = hf
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # ours, and Hugging Face's
    for variable in ("HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    # What this hub holds under the name gpt2 is what gpt2.py is told to expect of it
    served = hub.files["model.safetensors"]
    monkeypatch.setitem(weights.HUB_WEIGHTS, "gpt2", (len(served), hashlib.sha256(served).hexdigest()))
    monkeypatch.setitem(gpt2.HUB_ARCHITECTURES, "gpt2", dict(n_layer=2, n_head=4, n_embd=64,
                                                             block_size=64, vocab_size=512))
    return hub


def test_from_pretrained_downloads_from_hf_endpoint_and_caches(hub, tmp_path):
    model = gpt2.load_pretrained("gpt2")
    idx = random_tokens(512)
    torch.testing.assert_close(model(idx)[0], hf_logits(hub.hf, idx), atol=1e-4, rtol=0)
    cached = tmp_path / "cache/gpt2/hub/openai-community--gpt2/model.safetensors"
    assert cached.exists()
    del hub.files["model.safetensors"]  # the hub is gone: the cache must serve
    gpt2.load_pretrained("gpt2")


def hugging_face_cache(tmp_path, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache (huggingface_hub's layout) holding files as openai-community/gpt2."""
    repo = tmp_path / "cache/huggingface/hub/models--openai-community--gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("0123abcd")
    (repo / "snapshots/0123abcd").mkdir(parents=True)
    for name, data in files.items():
        (repo / "snapshots/0123abcd" / name).write_bytes(data)
    return repo / "snapshots/0123abcd"


def test_a_hugging_face_cache_holding_the_model_is_read_in_place_and_nothing_is_downloaded(
        hub, tmp_path):
    hugging_face_cache(tmp_path, hub.files)
    model = gpt2.load_pretrained("gpt2")
    idx = random_tokens(512)
    torch.testing.assert_close(model(idx)[0], hf_logits(hub.hf, idx), atol=1e-4, rtol=0)
    assert hub.paths == [] and not (tmp_path / "cache/gpt2").exists()


def test_a_hugging_face_cache_file_that_is_not_openais_is_left_as_it_is_and_downloaded_instead(
        hub, tmp_path):
    weights_file = bytearray(hub.files["model.safetensors"])
    weights_file[-1] ^= 0xFF  # the same size, another sha256
    snapshot = hugging_face_cache(tmp_path, {**hub.files, "model.safetensors": bytes(weights_file)})
    gpt2.load_pretrained("gpt2")
    assert hub.paths == [OPENAI + "model.safetensors"]  # its config.json was fine
    assert (snapshot / "model.safetensors").read_bytes() == weights_file  # not ours to delete
    assert (tmp_path / "cache/gpt2/hub/openai-community--gpt2/model.safetensors").exists()


def test_a_dropped_connection_is_resumed_and_gives_the_right_weights(hub):
    hub.faults["model.safetensors"] = ["drop"]
    model = gpt2.load_pretrained("gpt2")
    assert hub.faults["model.safetensors"] == []
    idx = random_tokens(512)
    torch.testing.assert_close(model(idx)[0], hf_logits(hub.hf, idx), atol=1e-4, rtol=0)


def test_a_download_that_keeps_failing_leaves_no_file_in_the_cache(hub, tmp_path, no_backoff):
    hub.faults["model.safetensors"] = ["drop"] * 100
    with pytest.raises(plumbing.UserError, match="cannot download"):
        gpt2.load_pretrained("gpt2")
    assert not (tmp_path / "cache/gpt2/hub/openai-community--gpt2/model.safetensors").exists()


@pytest.mark.parametrize("pinned", ["architecture", "weights"])
def test_a_mirror_serving_another_model_as_gpt2_is_refused_and_not_kept(hub, tmp_path, monkeypatch,
                                                                        pinned):
    # OpenAI's true gpt2: 12 layers, and its weights' published size and sha256. The mirror
    # serves the 2-layer model, without the hub's size headers.
    monkeypatch.setitem(gpt2.HUB_ARCHITECTURES if pinned == "architecture" else weights.HUB_WEIGHTS,
                        "gpt2", {"architecture": dict(gpt2.PRESETS["gpt2"]),
                                 "weights": (548_105_171, "248dfc3911869ec493c76e65bf2fcf7f615828b0"
                                             "254c12b473182f0f81d3a707")}[pinned])
    message = ("serves as gpt2 a model of 2 layers, 4 heads, 64 wide; OpenAI's has 12, 12, 768"
               if pinned == "architecture" else "548105171")
    with pytest.raises(plumbing.UserError, match=re.escape(message) if pinned == "architecture" else "548"):
        gpt2.load_pretrained("gpt2")
    cached = tmp_path / "cache/gpt2/hub/openai-community--gpt2"
    refused = "config.json" if pinned == "architecture" else "model.safetensors"
    assert not (cached / refused).exists() and not list(cached.glob("*.part"))


def test_a_missing_model_on_the_hub_is_a_clear_404(hub):
    with pytest.raises(plumbing.UserError, match=r"gpt2-xl/resolve/main/config.json: HTTP 404"):
        gpt2.load_pretrained("gpt2-xl")


# -- 1d. Errors a user can cause: one line, exit 1 ------------------------------------------------

def test_an_unknown_model_name_exits_1_with_one_line():
    code, _, err = run_script("gpt2.py", "sample", "--model", "gpt5")
    assert code == 1 and "Traceback" not in err
    assert err.strip() == ("error: unknown model 'gpt5': use one of gpt2, gpt2-medium, gpt2-large, "
                           "gpt2-xl or a folder with config.json and model.safetensors")


def test_a_folder_without_the_weights_is_named(tmp_path, run_main):
    (tmp_path / "config.json").write_text("{}")
    assert_one_error_line(run_main(cli.main, "sample", "--model", tmp_path), "has no model.safetensors")


def test_a_truncated_safetensors_file_is_named(tmp_path, run_main):
    hf_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_one_error_line(run_main(cli.main, "sample", "--model", tmp_path), "truncated or malformed")


def test_a_malformed_safetensors_header_is_named(tmp_path, run_main):
    hf_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    assert_one_error_line(run_main(cli.main, "sample", "--model", tmp_path), "malformed safetensors header")


def test_weights_of_the_wrong_shape_are_named(tmp_path, run_main):
    hf_model(n_embd=64).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 32}))
    err = assert_one_error_line(run_main(cli.main, "sample", "--model", tmp_path))
    assert "has shape (192,), the model expects (96,)" in err


# -- 2. Token shards and the loader ---------------------------------------------------------------

from fineweb import write_shard  # noqa: E402  (the writer the project uses, against our reader)


def write_numbered_shards(folder, sizes, split="train"):
    """Shards whose tokens are consecutive integers: every token says where it came from."""
    folder.mkdir(parents=True, exist_ok=True)
    start, paths = 0, []
    for i, n in enumerate(sizes):
        paths.append(folder / f"test_{split}_{i:06d}.bin")
        write_shard(paths[-1], np.arange(start, start + n))
        start += n
    return paths


def next_batch(loader: gpt2.ShardedDataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's inputs and targets, (B, T) each, as the training step cuts them."""
    windows = loader.next_windows()
    return windows[:, :-1], windows[:, 1:]


def test_shard_written_by_fineweb_reads_back_with_llm_c_header(tmp_path):
    path = tmp_path / "x_val_000000.bin"
    write_shard(path, [50256, 15496, 995])
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, 3] and not header[3:].any()
    assert gpt2.read_shard(path).tolist() == [50256, 15496, 995]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-2], "truncated or corrupt"),
    (lambda b: b"\x00" * 4 + b[4:], "not a token shard"),
    (lambda b: b[:4] + b"\x07\x00\x00\x00" + b[8:], "shard version 7"),
])
def test_a_damaged_shard_is_named_in_the_error(tmp_path, damage, message):
    path = tmp_path / "x_train_000001.bin"
    write_shard(path, np.arange(100))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(plumbing.UserError, match=message) as e:
        gpt2.read_shard(path)
    assert str(path) in str(e.value)


def rows_in_stream_order(paths, world_size, steps, B=2, T=8, grad_accum=2, seed=0):
    """Every rank's loader run for `steps` steps; their rows (x, y) put back in the order of the
    loader's window stream: step, then micro-step, then rank, then row."""
    loaders = [gpt2.ShardedDataLoader(paths, B, T, grad_accum, r, world_size, seed)
               for r in range(world_size)]
    batches = [[next_batch(ld) for _ in range(steps * grad_accum)] for ld in loaders]
    return loaders[0], [(x[b], y[b]) for i in range(steps * grad_accum)
                        for r in range(world_size) for x, y in [batches[r][i]] for b in range(B)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_is_read_once_per_epoch_and_ranks_never_overlap(tmp_path, world_size):
    sizes, T = [1000, 777, 1500], 8
    paths = write_numbered_shards(tmp_path, sizes)
    loader, rows = rows_in_stream_order(paths, world_size, steps=250, T=T)
    epoch = loader.epoch_windows
    assert epoch == sum((n - 1) // T for n in sizes)  # only a remainder < T per shard is left
    assert len(rows) >= 2 * epoch
    starts = [int(x[0]) for x, _ in rows]
    offsets = np.cumsum([0, *sizes[:-1]])
    every_window = sorted(int(o) + w * T for o, n in zip(offsets, sizes) for w in range((n - 1) // T))
    assert sorted(starts[:epoch]) == every_window  # each window once, by whichever rank
    assert sorted(starts[epoch:2 * epoch]) == every_window  # and again in the next epoch...
    assert starts[:epoch] != starts[epoch:2 * epoch]  # ...in another order
    for x, y in rows:
        assert torch.equal(x, torch.arange(int(x[0]), int(x[0]) + T))  # one run of the shard
        assert torch.equal(y, x + 1)  # the target is the next token


def test_a_step_gets_the_same_sequences_on_1_2_or_3_processes(tmp_path):
    paths = write_numbered_shards(tmp_path, [1000, 777, 1500])
    # 12 sequences a step: 1 x 6 micro-batches of 2, 2 x 3, 3 x 2
    streams = [rows_in_stream_order(paths, w, steps=40, grad_accum=6 // w)[1] for w in (1, 2, 3)]
    for other in streams[1:]:
        assert all(torch.equal(a[0], b[0]) for a, b in zip(streams[0], other))


def test_neighbouring_sequences_of_a_micro_batch_are_almost_never_neighbours_in_the_shard(tmp_path):
    T, B = 16, 32
    paths = write_numbered_shards(tmp_path, [60_000])  # 3,749 windows
    loader = gpt2.ShardedDataLoader(paths, B, T)
    adjacent = pairs = 0
    for _ in range(50):
        x, _ = next_batch(loader)
        adjacent += int((x[1:, 0] - x[:-1, 0]).abs().eq(T).sum())
        pairs += B - 1
    assert adjacent / pairs < 0.01  # a contiguous run of B * T tokens would give 1.0


def test_each_epoch_reshuffles_the_shards_identically_on_every_rank(tmp_path):
    paths = write_numbered_shards(tmp_path, [200] * 6)
    loaders = [gpt2.ShardedDataLoader(paths, 2, 8, 1, r, 2, seed=5) for r in range(2)]
    orders = {r: [] for r in range(2)}
    for r, loader in enumerate(loaders):
        for _ in range(2 * loader.steps_per_epoch):  # two epochs
            x, _ = next_batch(loader)
            shard = int(x[0, 0]) // 200
            if not orders[r] or orders[r][-1] != shard:
                orders[r].append(shard)
    assert orders[0] == orders[1]
    first, second = orders[0][:6], orders[0][6:]
    assert sorted(first) == sorted(second) == list(range(6)) and first != second


def test_the_videos_contiguous_loader_reads_in_order_and_over_an_epoch_the_windows_the_real_one_reads(
        tmp_path):
    B, T = 4, 8
    paths = write_numbered_shards(tmp_path, [B * T * 5 + 1])  # five micro-batches, exactly
    tokens = gpt2.read_shard(paths[0])
    ranks = [gpt2.ContiguousLoader(tokens, B, T, r, world_size=2) for r in range(2)]
    x, y = ranks[1].next_batch()  # rank 1 starts one micro-batch in, as in the video
    assert torch.equal(x.flatten(), torch.arange(B * T, 2 * B * T)) and torch.equal(y, x + 1)
    assert torch.equal(ranks[0].next_batch()[0].flatten(), torch.arange(B * T))
    contiguous = gpt2.ContiguousLoader(tokens, B, T)
    sharded = gpt2.ShardedDataLoader(paths, B, T, seed=3)
    read = {"contiguous": [], "sharded": []}
    for _ in range(sharded.steps_per_epoch):
        read["contiguous"] += [int(row[0]) for row in contiguous.next_batch()[0]]
        read["sharded"] += [int(row[0]) for row in next_batch(sharded)[0]]
    every_window = list(range(0, len(tokens) - 1, T))
    assert read["contiguous"] == every_window  # in order
    assert sorted(read["sharded"]) == every_window != read["sharded"]  # the same, from all over
    assert contiguous.next_batch()[0][0, 0] == 0  # the end of the data: back to the start


def test_loader_state_dict_round_trips_mid_epoch(tmp_path):
    paths = write_numbered_shards(tmp_path, [300, 500])
    a = gpt2.ShardedDataLoader(paths, 2, 8, 3, 1, 2, seed=1)
    for _ in range(7):  # mid-step (7 % 3 != 0) and mid-shard
        next_batch(a)
    b = gpt2.ShardedDataLoader(paths, 2, 8, 3, 1, 2, seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # plain data, as in a checkpoint
    for _ in range(40):  # across shard and epoch boundaries
        assert all(torch.equal(u, v) for u, v in zip(next_batch(a), next_batch(b)))


def test_validation_covers_the_same_tokens_whatever_the_micro_batch(tmp_path):
    tokens = gpt2.read_shard(write_numbered_shards(tmp_path, [3000], "val")[0]) % 500
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=1, n_head=2, n_embd=32))
    runtime = gpt2.Runtime()
    losses = {B: gpt2.evaluate_loss(model, tokens, 32, B, 2000, runtime, 0)
              for B in (1, 3, 8)}
    assert losses[1] == pytest.approx(losses[3], abs=1e-6) == pytest.approx(losses[8], abs=1e-6)


# -- 3. The learning-rate schedule --------------------------------------------------------------

def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    lr = lambda step: gpt2.get_lr(step, max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)
    assert lr(0) == pytest.approx(6e-5)  # 1/10 of the way up
    assert lr(9) == pytest.approx(6e-4)  # end of warmup: the peak
    assert lr(60) == pytest.approx((6e-4 + 6e-5) / 2)  # halfway down the cosine
    assert lr(110) == pytest.approx(6e-5) and lr(500) == pytest.approx(6e-5)


def test_weight_decay_applies_to_matrices_only():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    decay, no_decay = gpt2.configure_optimizer(model, 1e-3, 0.1).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# -- 7. Training end to end, on Tiny Shakespeare --------------------------------------------------

@pytest.mark.slow  # a learning run end to end: minutes on 2 cores
def test_a_small_model_learns_tiny_shakespeare(shakespeare, tmp_path):
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path, *TINY_RUN, "--n_embd", "128",
               "--max_steps", "120", "--eval_every", "120", "--val_tokens", "4096"])
    losses = train_losses(tmp_path)  # 120 steps of 512 tokens: 7.5 epochs of the 8k-token shard
    assert losses[0] == pytest.approx(math.log(gpt2.VOCAB_SIZE), abs=0.15)  # ~10.8
    assert np.mean(losses[-5:]) < 5.5
    val = [e["val_loss"] for e in training.read_events(tmp_path) if "val_loss" in e]
    assert val[-1] < val[0] - 3.5  # and it generalizes to unseen Shakespeare


def test_resume_continues_bit_exactly(shakespeare, shared_run, tmp_path):
    # The shared run of 6 steps checkpoints at 2, 4 and 6. A second run resumes from the
    # step-2 checkpoint alone: its last 4 losses and final weights must equal the first run's.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(checkpoints.Checkpoints(shared_run).path(2), resumed)
    cli.main(["--data_dir", shakespeare, "--log_dir", resumed, *SHARED_RUN, "--resume"])
    assert train_losses(resumed) == train_losses(shared_run)[2:]
    a = torch.load(shared_run / "ckpt_00000006.pt", weights_only=True)
    b = torch.load(resumed / "ckpt_00000006.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["loader"] == b["loader"]


def test_the_flags_are_saved_as_given_under_a_version_and_what_auto_resolved_apart(shared_run):
    stored = torch.load(checkpoints.Checkpoints(shared_run).path(2), weights_only=True)["train_config"]
    assert stored["version"] == config.VERSION
    assert (stored["machine"]["compile"], stored["machine"]["loss_chunk"]) == ("auto", -1)
    assert stored["resolved"] == {"batch_size": 4, "compile": False, "loss_chunk": 256}  # a CPU's
    assert stored["recipe"]["max_lr"] == 1e-2 and stored["logs"]["log_dir"] == str(shared_run)


def test_a_checkpoint_with_the_flat_flags_of_before_or_lacking_a_flag_resumes_exactly(
        shakespeare, shared_run, tmp_path, run_main):
    # The step-2 checkpoint as an older gpt2.py wrote it (the flat flags, resolved values over
    # them), and as one without a flag that came later and without the resolved values.
    saved = torch.load(checkpoints.Checkpoints(shared_run).path(2), weights_only=True)
    stored = saved.pop("train_config")
    older = {**saved, "args": {**config.stored_flags(stored), "batch_size": 4, "loss_chunk": 256,
                               "compile": "off", "command": "train", "changed_on_resume": []}}
    del older["changed_on_resume"]
    lacking = {**saved, "train_config": {
        "version": stored["version"], **{name: stored[name] for name in config.SECTIONS},
        "recipe": {k: v for k, v in stored["recipe"].items() if k != "skip_spikes_limit"}}}
    for name, state in (("older", older), ("lacking", lacking)):
        log_dir = tmp_path / name
        log_dir.mkdir()
        torch.save(state, checkpoints.Checkpoints(log_dir).path(2))
        code, out, err = run_main(cli.main, "--data_dir", shakespeare, "--log_dir", log_dir,
                                  *SHARED_RUN, "--resume")
        assert code == 0, err
        assert train_losses(log_dir) == train_losses(shared_run)[2:], name
        assert all(torch.equal(final_weights(shared_run, 6)[k], v)
                   for k, v in final_weights(log_dir, 6).items())
        if name == "lacking":  # what it lacks is not a change (its folder is)
            assert "--log_dir" in out and "skip_spikes_limit" not in out, out


def test_every_training_flag_is_a_field_of_one_frozen_section_and_comes_back_whole():
    flags = vars(cli.train_parser().parse_args([]))
    fields = [f.name for kind in config.SECTIONS.values() for f in dataclasses.fields(kind)]
    assert sorted(fields) == sorted(flags)  # each flag in one section, and no field without one
    cfg = TrainConfig.from_flags(flags)
    assert cfg.flags() == flags
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.recipe.batch_size = 8  # a resolved value goes to cfg.resolve, a new config
    assert cfg.resolve(batch_size=8).resolved.batch_size == 8 and cfg.recipe.batch_size == "auto"


@pytest.mark.parametrize("flags, message", [
    (["--fsdp", "--batch_size", "auto"], "--fsdp needs a --batch_size"),
    (["--init_from", "gpt2"], "--init_from takes the architecture from its source"),
    (["--block_size", "32"], "--seq_len 64 > --block_size 32"),
    (["--n_head", "3"], "n_embd=64 is not divisible by n_head=3"),
    (["--val_tokens", "10"], "--val_tokens 10 < --seq_len 64"),
    (["--batch_size", "3"], "--batch_size 2 divides it")])
def test_each_refusal_of_the_flags_comes_before_the_process_group_and_the_model(
        shakespeare, tmp_path, run_main, monkeypatch, flags, message):
    monkeypatch.setattr(gpt2, "setup_distributed", lambda *a, **k: pytest.fail("not validated"))
    assert_one_error_line(run_main(cli.main, "--data_dir", shakespeare, "--log_dir", tmp_path,
                                   *TINY_RUN, *flags), message)


# -- 7b. Errors a user can cause when training --------------------------------------------------

def test_no_shards_says_run_fineweb_first(tmp_path, run_main):
    err = assert_one_error_line(run_main(cli.main, "--data_dir", tmp_path / "empty", "--log_dir", tmp_path))
    assert err == f"error: no token shards in {tmp_path / 'empty'}: run `python fineweb.py` first (or pass --data_dir)"


def test_a_shard_with_a_bad_header_stops_training_with_its_name(tmp_path, run_main):
    bad = tmp_path / "data/x_train_000001.bin"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00" * 2048)
    err = assert_one_error_line(run_main(cli.main, "--data_dir", bad.parent, "--log_dir", tmp_path, *TINY_RUN))
    assert str(bad) in err and "not a token shard" in err


def test_a_total_batch_not_divisible_by_the_micro_batch_is_refused(shakespeare, tmp_path, run_main):
    err = assert_one_error_line(run_main(cli.main, "--data_dir", shakespeare, "--log_dir", tmp_path, *TINY_RUN,
                                    "--total_batch_size", "1000"))
    assert "--total_batch_size 1000 is not divisible by batch_size * seq_len * world_size" in err


def test_a_corrupt_checkpoint_is_named_and_left_alone(shakespeare, shared_run, tmp_path, run_main):
    log_dir = copy_run(shared_run, tmp_path / "run")
    common = ["--data_dir", shakespeare, "--log_dir", log_dir, *SHARED_RUN]
    ckpt = log_dir / "ckpt_00000006.pt"
    damaged = ckpt.read_bytes()[:5000]
    ckpt.write_bytes(damaged)
    err = assert_one_error_line(run_main(cli.main, *common, "--resume"))
    assert str(ckpt) in err and "corrupt or truncated checkpoint" in err
    assert ckpt.read_bytes() == damaged


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(shakespeare, shared_run, tmp_path, run_main):
    log_dir = copy_run(shared_run, tmp_path / "run", until=2)
    common = ["--data_dir", shakespeare, "--log_dir", log_dir, *SHARED_RUN]
    err = assert_one_error_line(run_main(cli.main, *common, "--max_steps", "4", "--resume", "--max_lr", "1e30"))
    assert "loss is nan" in err and "ckpt_00000002.pt" in err
    assert [p.name for p in checkpoints.Checkpoints(log_dir).list()] == ["ckpt_00000002.pt"]


# -- 5. Device and precision choice ---------------------------------------------------------------

def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert parallel.pick_device("auto", local_rank=3) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert parallel.pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert parallel.pick_device("auto") == torch.device("cpu")
    with pytest.raises(plumbing.UserError, match="no CUDA GPU"):
        parallel.pick_device("cuda")


def test_dtype_auto_is_bf16_on_new_gpus_fp16_on_old_ones_fp32_elsewhere(monkeypatch):
    cuda = torch.device("cuda", 0)
    # Recent torch says bf16 is "supported" on a T4 too (emulated): the capability decides.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, dtype in [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                              ((7, 5), torch.float16), ((7, 0), torch.float16)]:  # H100 A100 T4 V100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert parallel.pick_dtype("auto", cuda) == dtype, capability
    assert parallel.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert parallel.pick_dtype("auto", torch.device("mps")) == torch.float32
    assert parallel.pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_each_process_takes_local_rank_modulo_the_gpus_it_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # SLURM --gpus-per-task=1
    assert parallel.pick_device("auto", local_rank=5) == torch.device("cuda", 0)
    assert parallel.pick_device("cuda", local_rank=5) == torch.device("cuda", 0)
    with pytest.raises(plumbing.UserError, match="--device cuda:1 under torchrun"):
        parallel.pick_device("cuda:1", local_rank=0)
    assert parallel.pick_device("cuda:0") == torch.device("cuda", 0)  # fine in a plain run


def test_a_single_process_run_makes_its_gpu_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    ctx = gpt2.setup_distributed("cuda:2", "auto")
    assert chosen == [torch.device("cuda", 2)] and ctx.device == torch.device("cuda", 2)
    assert ctx.dtype == torch.bfloat16 and not ctx.ddp


def test_mfu_peaks_follow_the_dtype_and_whole_gpu_names():
    peak = training.peak_flops_of
    assert peak("NVIDIA L4", torch.bfloat16) == 121e12
    assert peak("NVIDIA L40S", torch.bfloat16) == 362e12
    assert peak("NVIDIA A10", torch.bfloat16) == 125e12 != peak("NVIDIA A100-SXM4-80GB", torch.bfloat16)
    assert peak("NVIDIA H100 NVL", torch.bfloat16) == 835e12
    assert peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    # float32 runs (TF32 matmuls) are measured against the TF32 peak, half the bf16 one
    assert peak("NVIDIA A100-SXM4-80GB", torch.float32) == 156e12
    assert peak("Some Future GPU", torch.bfloat16) is None  # then the log simply has no MFU
    # each name its own figure (datasheets, dense bf16), not a relative's found inside it
    for name, bf16 in [("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
                       ("Tesla V100-SXM2-32GB", 125e12), ("Tesla V100-PCIE-16GB", 112e12),
                       ("Tesla V100S-PCIE-32GB", 130e12), ("NVIDIA B200", 2250e12),
                       ("NVIDIA H800", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA L40", 181e12),
                       ("NVIDIA RTX A6000", 155e12), ("NVIDIA RTX 6000 Ada Generation", 364e12),
                       ("NVIDIA GH200 480GB", 989e12), ("Tesla T4", 65e12)]:
        assert peak(name, torch.bfloat16) == bf16, name


def test_mps_gets_float32_accumulators_and_no_autocast_context():
    mps = torch.device("mps")
    assert parallel.accumulator_dtype(mps) == torch.float32  # mps has no float64
    assert parallel.accumulator_dtype(torch.device("cpu")) == torch.float64
    assert isinstance(gpt2.autocast_context(gpt2.Runtime(device=mps)), contextlib.nullcontext)


def test_training_forward_returns_the_loss_without_logits():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    idx = torch.zeros(2, 4, dtype=torch.long)
    for chunk in (0, 3):
        logits, loss = model(idx, idx, loss_chunk=chunk)
        assert logits is None and loss.ndim == 0
    assert model(idx)[0].shape == (2, 4, 64)


def test_the_chunked_loss_is_never_traced_by_torch_compile():
    # A backend that keeps the graphs torch.compile hands it, and runs them as they are.
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    x, weight = torch.randn(2, 3, 8), torch.randn(32, 8)  # (B, T, C), (V, C)
    targets = torch.randint(0, 30, (2, 3))
    loss = torch.compile(lambda x: gpt2.chunked_cross_entropy(x * 2, weight, targets, 30, 4),
                         backend=recording_backend)(x)
    assert torch.allclose(loss, gpt2.chunked_cross_entropy(x * 2, weight, targets, 30, 4))
    ops = [str(node.target) for gm in graphs for node in gm.graph.nodes
           if node.op in ("call_function", "call_method")]
    assert any("mul" in op for op in ops), ops  # the caller's `x * 2` was compiled...
    assert not [op for op in ops if "mm" in op or "exp" in op], ops  # ...the loss's matmuls not


def test_compile_defaults_to_on_for_cuda_and_off_elsewhere(monkeypatch):
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda *a: None)
    monkeypatch.setattr(gpt2.importlib.util, "find_spec", lambda name: object())  # Triton is there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    for device, expected in [("cuda", True), ("cpu", False), ("mps", False)]:
        assert gpt2.speed_settings("auto", -1, torch.device(device))["compile"] is expected
    args = cli.train_parser().parse_args(["--compile", "off"])
    assert gpt2.speed_settings(args.compile, args.loss_chunk, torch.device("cuda"))["compile"] is False


def test_checkpoints_load_onto_the_cpu_and_restore_the_rng_states(shared_run):
    state = checkpoints.Checkpoints.load(shared_run / "ckpt_00000002.pt")
    tensors = [state["rng"][0]["torch"], *state["model"].values()]
    assert all(t.device.type == "cpu" for t in tensors)
    checkpoints.set_rng_state(state["rng"][0])
    first = torch.rand(3)
    checkpoints.set_rng_state(state["rng"][0])
    assert torch.equal(torch.rand(3), first)


@pytest.mark.parametrize("saved_fused, our_fused", [(False, True), (True, False)])
def test_an_optimizer_state_saved_with_another_fused_setting_resumes_with_ours(saved_fused, our_fused):
    def adamw(fused):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    model, saved = adamw(saved_fused)
    model(torch.ones(2, 4)).sum().backward()
    saved.step()
    model2, ours = adamw(our_fused)
    checkpoints.load_optimizer_state(ours, saved.state_dict())
    assert all(g["fused"] is our_fused for g in ours.param_groups)
    model2(torch.ones(2, 4)).sum().backward()
    ours.step()  # runs: each step counter sits where our setting needs it
    assert all(s["step"].item() == 2 for s in ours.state.values())


def test_a_bf16_checkpoint_resumes_as_an_fp16_run_with_a_fresh_gradient_scaler(shakespeare, tmp_path):
    common = ["--data_dir", shakespeare, "--log_dir", tmp_path, *TINY_RUN]
    cli.main([*common, "--max_steps", "2", "--dtype", "bfloat16"])
    cli.main([*common, "--max_steps", "3", "--dtype", "float16", "--resume"])
    assert len(train_losses(tmp_path)) == 3 and all(map(math.isfinite, train_losses(tmp_path)))
    scaler = torch.load(tmp_path / "ckpt_00000003.pt", weights_only=True)["scaler"]
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 1  # torch's fresh default


def test_fp16_autocast_with_a_gradient_scaler_trains_on_the_cpu(shakespeare, tmp_path):
    ctx = gpt2.Runtime(dtype=torch.float16)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    with gpt2.autocast_context(ctx):
        assert model(torch.zeros(1, 4, dtype=torch.long))[0].dtype == torch.float16
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path, *TINY_RUN, "--max_steps", "3",
               "--dtype", "float16"])
    assert all(math.isfinite(loss) for loss in train_losses(tmp_path))
    scaler = torch.load(tmp_path / "ckpt_00000003.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 1 and scaler["_growth_tracker"] == 3  # 3 unskipped scaled steps


def test_an_evaluation_added_to_chapter_7s_list_is_logged_plotted_and_on_the_model_card(
        shakespeare, tmp_path, monkeypatch):
    # One entry in the list and its score, nothing else: the event, plot and the card follow.
    def val_mean(model, tokens, args, runtime, stop):
        return {"val_mean": float(tokens[:100].mean())}
    extra = training.Evaluation("val_mean", "Mean val token", "eval_every", gpt2.val_split, val_mean)
    listed = gpt2.all_evaluations
    monkeypatch.setattr(gpt2, "all_evaluations", lambda: [*listed(), extra])
    monkeypatch.setattr(tools, "all_evaluations", gpt2.all_evaluations)
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path, *TINY_RUN, "--max_steps", "2",
              "--eval_every", "1"])
    val = gpt2.read_shard(shards.data_files(shakespeare)[1][0])
    events = [e for e in training.read_events(tmp_path) if "val_mean" in e]
    assert [(e["step"], e["val_mean"]) for e in events] == [(s, float(val[:100].mean())) for s in (0, 1, 2)]
    import matplotlib.axes
    drawn, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: drawn.append(k.get("label")) or plot(self, *a, **k))
    cli.main(["plot", "--log_dir", tmp_path])
    assert drawn == ["train loss", "Validation loss", "Mean val token"]
    cli.main(["export", "--checkpoint", checkpoints.Checkpoints(tmp_path).path(2), "--out", tmp_path / "hf"])
    card = (tmp_path / "hf/README.md").read_text()
    assert f"- Mean val token: {events[-1]['val_mean']:.4f} at step 2" in card
    assert "- CORE" not in card and "- HellaSwag" not in card  # the run had neither


# -- 8. Tools -------------------------------------------------------------------------------------

def test_plot_writes_a_png_of_a_short_run(shakespeare, tmp_path):
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path, *TINY_RUN, "--max_steps", "4",
               "--eval_every", "2", "--hellaswag_every", "2",
               "--hellaswag_file", HERE / "samples/hellaswag_val_1000.jsonl",
               "--hellaswag_limit", "8"])
    cli.main(["plot", "--log_dir", tmp_path, "--out", tmp_path / "run.png"])
    png = (tmp_path / "run.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 800 and height >= 400
    assert [e["hellaswag"] for e in training.read_events(tmp_path) if "hellaswag" in e] != []


def test_bench_reports_every_figure_as_json_on_its_last_line(capsys):
    cli.main(["bench", "--model", "tiny", "--n_embd", "64", "--batch_size", "2", "--seq_len",
               "32", "--reps", "2", "--warmup", "1", "--gen_tokens", "8", "--device", "cpu",
               "--vs_transformers"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("train_tok_s", "mfu", "peak_flops", "gen_tok_s_cache", "gen_tok_s_nocache",
                "peak_rss_mib", "loader_batches_s", "gen_tok_s_transformers"):
        assert result[key] > 0, key
    assert 0 < result["mfu"] < 1.5


# -- The README's quick start, as written (shortened: fewer steps) --------------------------------

def quickstart_commands() -> list[str]:
    readme = (HERE / "README.md").read_text()
    block = readme.split("<!-- quickstart -->")[1].split("<!-- /quickstart -->")[0]
    return [line for line in block.splitlines() if line.startswith("python ")]


@pytest.mark.slow  # the README's commands as a user runs them: four processes
def test_readme_quick_start_runs_as_written(tmp_path):
    commands = quickstart_commands()
    assert [c.split()[1] for c in commands] == ["fineweb.py", "gpt2.py", "gpt2.py", "gpt2.py"]
    for command in commands:
        command = (command.replace("data/quickstart", str(tmp_path / "data"))
                   .replace("log/quickstart", str(tmp_path / "log"))
                   .replace("assets/quickstart.png", str(tmp_path / "quickstart.png"))
                   .replace("--max_steps 40", "--max_steps 2")
                   .replace("--hellaswag_limit 200", "--hellaswag_limit 20")
                   .replace("ckpt_00000040.pt", "ckpt_00000002.pt"))
        r = subprocess.run(command, shell=True, cwd=HERE, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert (tmp_path / "quickstart.png").stat().st_size > 20_000


def test_the_story_of_gpt2_py_ends_with_the_training_loop_before_line_1000():
    lines = (HERE / "gpt2.py").read_text().splitlines()
    appendix = next(i for i, line in enumerate(lines, 1) if line.startswith("# A. Appendix"))
    loop = next(i for i, line in enumerate(lines, 1) if line.startswith("def run_training("))
    assert loop < appendix < 1000


def test_each_line_the_video_map_names_defines_what_its_row_says():
    lines = (HERE / "gpt2.py").read_text().splitlines()
    rows = re.findall(r"^\|.*\| `([\w.]+)`[^|]*\| gpt2\.py:(\d+) \|$",
                      (HERE / "docs/video.md").read_text(), re.M)
    assert len(rows) >= 9  # forward, attention, from_pretrained, two loaders, optimizer, lr, loop, step
    for name, number in rows:
        *owner, last = name.split(".")
        assert re.match(rf"\s*(def|class) {last}\b", lines[int(number) - 1]), (name, number)
        if owner:  # a method: the nearest class above it is its owner
            above = [line for line in lines[:int(number)] if line.startswith("class ")]
            assert above[-1].startswith(f"class {owner[0]}("), (name, number)


LAYERS = ["plumbing", "config", "fineweb", "hellaswag", "core", "weights", "parallel", "shards",
          "muon", "checkpoints", "training", "gpt2", "tools", "cli"]  # each imports only those before it
DOORS = ("TYPE_CHECKING", "__name__ == '__main__'")


def imports_of(path: Path) -> set[str]:
    """The modules a file imports when it runs: not under TYPE_CHECKING (annotations only), nor
    in its `if __name__ == "__main__":` block, nor in a function that only its command line
    calls (the doors named `parser`, `main`)."""
    names = set()

    def visit(node):
        if isinstance(node, ast.If) and ast.unparse(node.test) in DOORS:
            return
        if isinstance(node, ast.FunctionDef) and node.name in ("parser", "main") and path.stem != "cli":
            return
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(ast.parse(path.read_text()))
    return names


def test_imports_run_one_way_down_the_layers_and_plumbing_needs_no_torch():
    for i, name in enumerate(LAYERS):
        ours = imports_of(HERE / f"{name}.py") & set(LAYERS)
        assert ours <= set(LAYERS[:i]), (name, ours - set(LAYERS[:i]))
    assert not imports_of(HERE / "plumbing.py") & {"torch", "numpy"}
    assert not imports_of(HERE / "fineweb.py") & {"torch"}
    assert set(LAYERS) | {"conftest"} >= {p.stem for p in HERE.glob("*.py") if not p.stem.startswith("test_")}


def test_the_readme_is_at_most_300_lines():
    assert len((HERE / "README.md").read_text().splitlines()) <= 300


def test_no_file_names_an_issue_a_commit_or_a_before_and_after():
    history = re.compile(r"\bissue #?\d+|\bcommit [0-9a-f]{7,40}\b|\bbefore this change\b", re.I)
    for path in [*HERE.glob("*.py"), HERE / "README.md", *HERE.glob("docs/*.md")]:
        assert not history.search(path.read_text()), path.name


def test_nodes_without_the_checkpoint_stop_with_one_line_instead_of_hanging(shakespeare, shared_run,
                                                                            tmp_path):
    # Two "nodes" without a shared filesystem: node 0's log_dir has the checkpoint, node 1's
    # does not. Every rank must stop with the same line, promptly, not wait for a timeout.
    common = ["--data_dir", shakespeare, *TINY_RUN, "--max_steps", "3", "--device", "cpu",
              "--resume", "--dist_timeout", "120"]
    (tmp_path / "node0").mkdir()
    shutil.copy(checkpoints.Checkpoints(shared_run).path(2), tmp_path / "node0")
    (tmp_path / "node1").mkdir()
    rendezvous = ["--nnodes=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    nodes = [torchrun(*common, "--log_dir", tmp_path / f"node{rank}", nproc=1,
                      extra=[*rendezvous, f"--node_rank={rank}"]) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        path = tmp_path / f"node{rank}" / "ckpt_00000002.pt"  # each rank names its own path
        assert node.returncode != 0, out
        assert f"error: cannot resume from {path}: rank(s) [1] cannot read it" in out, out
    assert [p.name for p in checkpoints.Checkpoints(tmp_path / "node0").list()] == ["ckpt_00000002.pt"]


def test_two_nodes_resuming_a_1_process_checkpoint_take_the_1_process_runs_steps(
        shakespeare, shared_run, tmp_path):
    # 512 tokens a step: 1 process x 2 micro-batches x 4 x 64 in the shared run; 2 processes x
    # 1 x 4 x 64 here, one on each of two "nodes" on localhost (torchrun's multi-node rendezvous).
    # DDP on 2 processes computes what one process does with twice the accumulation, and the
    # loader's position at a step boundary does not depend on the world size: so a 1-process
    # checkpoint continued by 2 processes gives the losses and val losses the 1-process run gave.
    for rank in (0, 1):  # no shared filesystem: each node has its own copy
        (tmp_path / f"node{rank}").mkdir()
        shutil.copy(checkpoints.Checkpoints(shared_run).path(2), tmp_path / f"node{rank}")
    common = ["--data_dir", shakespeare, *SHARED_RUN, "--device", "cpu", "--resume"]
    rendezvous = ["--nnodes=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    nodes = [torchrun(*common, "--log_dir", tmp_path / f"node{rank}", nproc=1,
                      extra=[*rendezvous, f"--node_rank={rank}"]) for rank in (0, 1)]
    for node in nodes:
        finish(node)
    later = [e for e in training.read_events(shared_run) if e.get("step", -1) >= 2]
    ddp = training.read_events(tmp_path / "node0")
    for key in ("loss", "val_loss"):
        assert [e["step"] for e in ddp if key in e] == [e["step"] for e in later if key in e]
        np.testing.assert_allclose([e[key] for e in ddp if key in e],
                                   [e[key] for e in later if key in e], atol=1e-5, rtol=0)
    # only global rank 0 writes logs and checkpoints
    assert [p.name for p in (tmp_path / "node1").iterdir()] == ["ckpt_00000002.pt"]


# -- On a CUDA GPU (skipped elsewhere; run them alone with `python -m pytest -q -m gpu`) ----------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_RUN = [*TINY_RUN, "--device", "cuda", "--checkpoint_every", "3", "--keep_checkpoints", "5"]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_training_resumes_from_a_checkpoint_with_the_same_losses(shakespeare, tmp_path, dtype):
    if dtype == "bfloat16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--data_dir", shakespeare, *GPU_RUN, "--max_steps", "6", "--dtype", dtype,
              "--compile", "off"]
    cli.main([*common, "--log_dir", full])
    resumed.mkdir()
    (resumed / "ckpt_00000003.pt").write_bytes((full / "ckpt_00000003.pt").read_bytes())
    cli.main([*common, "--log_dir", resumed, "--resume"])  # crashed before: CUDA RNG states
    # GPU kernels (atomics in the embedding backward) are not bit-deterministic: close, not equal
    np.testing.assert_allclose(train_losses(resumed), train_losses(full)[3:], atol=2e-3, rtol=0)
    scaler = torch.load(resumed / "ckpt_00000006.pt", weights_only=True)["scaler"]
    assert (scaler["scale"] > 1) if dtype == "float16" else scaler == {}


@pytest.fixture(scope="module")
def shakespeare_2m(tmp_path_factory, shakespeare_tokens):
    """Tiny Shakespeare repeated to 2M training tokens: steps of 2**19 tokens need 512 windows."""
    folder = tmp_path_factory.mktemp("shakespeare_2m")
    write_shard(folder / "shakespeare_val_000000.bin", shakespeare_tokens[:70_000])
    write_shard(folder / "shakespeare_train_000001.bin", np.tile(shakespeare_tokens, 7)[:2_000_000])
    return folder


@pytest.mark.gpu
@needs_gpu
def test_gpu_the_124m_recipe_runs_at_its_default_micro_batch_compiled(shakespeare_2m, tmp_path,
                                                                     capsys):
    torch.cuda.reset_peak_memory_stats()
    cli.main(["--data_dir", shakespeare_2m, "--log_dir", tmp_path, "--max_steps", "3",
               "--val_tokens", "65536", "--hellaswag_every", "0", "--num_samples", "0"])
    out = capsys.readouterr().out
    chosen = int(re.search(r"--batch_size auto: (\d+) sequences", out)[1])
    accum = int(re.search(r"x (\d+) accum x 1", out)[1])
    assert chosen * 1024 * accum == 2 ** 19  # the step stays GPT-3 small's 0.5M tokens
    steps = [e for e in training.read_events(tmp_path) if "loss" in e]
    assert len(steps) == 3 and all(math.isfinite(e["loss"]) for e in steps)
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    with capsys.disabled():
        print(f"\n124M recipe on {torch.cuda.get_device_name()}: --batch_size auto = {chosen}, "
              f"peak {peak_gib:.1f} GiB, {steps[-1]['ms']:.0f} ms/step, "
              f"{steps[-1]['tokens_per_s']:,.0f} tok/s, MFU {100 * steps[-1].get('mfu', 0):.1f}%")
    if training.datasheet_peak_flops(torch.device("cuda"), torch.bfloat16):
        assert 0.05 < steps[-1]["mfu"] < 1


@pytest.mark.gpu
@needs_gpu
def test_gpu_compiled_training_evaluates_scores_hellaswag_and_samples_without_recompiling(
        shakespeare, tmp_path, monkeypatch):
    # Train, evaluate (val loss, HellaSwag, samples: the raw model), train again, with dropout:
    # the compiled training graph must never be compiled a second time.
    import torch._dynamo
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path, *GPU_RUN, "--max_steps", "4",
               "--eval_every", "2", "--num_samples", "1", "--compile", "on", "--dropout", "0.1",
               "--hellaswag_every", "2", "--hellaswag_file", HERE / "samples/hellaswag_val_1000.jsonl",
               "--hellaswag_limit", "40"])
    evals = [e for e in training.read_events(tmp_path) if "val_loss" in e]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(e["samples"] for e in evals)
    assert all(0 <= e["hellaswag"] <= 1 for e in evals)
    known = training.datasheet_peak_flops(torch.device("cuda"), torch.bfloat16) is not None
    # MFU is logged on the GPUs whose datasheet we know, and simply absent on others
    assert all(("mfu" in e) == known for e in training.read_events(tmp_path) if "loss" in e)
    code, out, err = run_script("gpt2.py", "sample", "--checkpoint", tmp_path / "ckpt_00000004.pt",
                                "--num_samples", "2", "--max_new_tokens", "8", "--seed", "0")
    assert code == 0 and out.startswith("-" * 80), err


@pytest.mark.gpu
@needs_gpu
def test_gpu_compiled_and_eager_training_give_the_same_losses(shakespeare, tmp_path):
    runs = {}
    for mode in ("on", "off"):
        cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path / mode, *GPU_RUN,
                   "--max_steps", "4", "--compile", mode])
        runs[mode] = train_losses(tmp_path / mode)
    # bf16 (or fp16) matmuls, fused differently: close, not equal
    np.testing.assert_allclose(runs["on"], runs["off"], atol=0.02, rtol=0)


@pytest.mark.gpu
@needs_gpu
def test_gpu_fp16_with_a_gradient_scaler_trains_compiled(shakespeare, tmp_path):
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path, *GPU_RUN, "--max_steps", "3",
               "--dtype", "float16", "--compile", "on"])
    assert all(math.isfinite(loss) for loss in train_losses(tmp_path))
    scaler = torch.load(tmp_path / "ckpt_00000003.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 1


@pytest.mark.gpu
@needs_gpu
def test_gpu_hellaswag_packed_rows_score_as_four_plain_rows():
    import hellaswag

    class Plain(torch.nn.Module):  # the same model, seen only as tokens -> logits
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, idx):
            return self.model(idx)[0]

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("mini")).cuda().eval()
    examples = hellaswag.load_examples(file=HERE / "samples/hellaswag_val_1000.jsonl", limit=200)
    rendered = [hellaswag.render_example(ex)[:2] for ex in examples]
    packed = hellaswag.ending_losses(model, rendered, "cuda")
    plain = hellaswag.ending_losses(Plain(model), rendered, "cuda")
    torch.testing.assert_close(packed, plain, atol=1e-3, rtol=1e-4)  # float32, other kernels


@pytest.mark.gpu
@needs_gpu
def test_gpu_the_kv_cache_gives_the_full_forward_logits_in_bf16():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("mini", block_size=64)).cuda().eval()
    idx = random_tokens(gpt2.VOCAB_SIZE, (2, 24)).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(idx)[0][:, 8:].float()
        cached = fused_steps(model, idx).float()
    # bf16 keeps 8 bits of mantissa: logits of size ~1 agree to a few hundredths
    assert (cached - full).abs().max() < 0.1
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.95


@pytest.mark.gpu
@needs_gpu
def test_gpu_muon_split_and_whole_train_compiled_and_resume_with_the_same_losses(shakespeare,
                                                                                tmp_path):
    for qkv in ("split", "whole"):  # ours in bfloat16, torch's own step
        full, resumed = tmp_path / qkv / "full", tmp_path / qkv / "resumed"
        common = ["--data_dir", shakespeare, *GPU_RUN, "--optimizer", "muon", "--muon_qkv", qkv,
                  "--max_steps", "6", "--compile", "on"]
        cli.main([*common, "--log_dir", full])
        resumed.mkdir(parents=True)
        shutil.copy(checkpoints.Checkpoints(full).path(3), resumed)
        cli.main([*common, "--log_dir", resumed, "--resume"])
        losses = train_losses(full)
        assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
        np.testing.assert_allclose(train_losses(resumed), losses[3:], atol=2e-3, rtol=0)  # as above


@pytest.mark.gpu
@needs_gpu
def test_gpu_two_processes_on_one_gpu_over_gloo_match_one_process(shakespeare, tmp_path):
    common = ["--data_dir", shakespeare, *GPU_RUN, "--max_steps", "4", "--compile", "off",
              "--dtype", "float32"]
    cli.main([*common, "--log_dir", tmp_path / "single"])
    finish(torchrun(*common, "--log_dir", tmp_path / "two", "--dist_backend", "gloo",
                    extra=["--standalone"]))
    np.testing.assert_allclose(train_losses(tmp_path / "two"), train_losses(tmp_path / "single"),
                               atol=1e-4, rtol=0)


@pytest.mark.gpu
@needs_gpu
def test_gpu_one_process_torchrun_trains_over_nccl(shakespeare, tmp_path):
    out = finish(torchrun("--data_dir", shakespeare, "--log_dir", tmp_path, *GPU_RUN,
                          "--max_steps", "2", "--compile", "off", nproc=1, extra=["--standalone"]))
    assert "1 x cuda" in out and len(train_losses(tmp_path)) == 2


@pytest.mark.gpu
@needs_gpu
def test_gpu_bench_reports_mfu_against_the_datasheet(capsys):
    cli.main(["bench", "--model", "mini", "--batch_size", "8", "--seq_len", "256", "--reps", "3",
               "--warmup", "2", "--gen_tokens", "16", "--device", "cuda"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < result["mfu"] < 1
    if training.datasheet_peak_flops(torch.device("cuda"), torch.bfloat16):
        assert 0 < result["mfu_datasheet"] < 1


@pytest.mark.gpu
@needs_gpu
def test_gpu_hellaswag_in_bf16_agrees_with_float32_on_1000_rows():
    # Tolerance: bf16 keeps 8 bits of mantissa, so near-tied endings may flip. Random weights
    # (no download) make more ties than a trained model would: at least 90% of the choices
    # agree, and the accuracy moves by at most 3 points.
    import hellaswag
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("mini")).cuda()
    examples = hellaswag.load_examples(file=HERE / "samples/hellaswag_val_1000.jsonl")
    _, _, fp32 = hellaswag.predict(model, examples, "cuda", autocast_dtype=None)
    _, _, bf16 = hellaswag.predict(model, examples, "cuda", autocast_dtype=torch.bfloat16)
    labels = torch.tensor([ex["label"] for ex in examples])
    assert (fp32 == bf16).float().mean() >= 0.9
    assert abs((fp32 == labels).float().mean() - (bf16 == labels).float().mean()) <= 0.03


# -- Fine-tuning: pretrained weights in, dropout, your own text ----------------------------------

FINETUNE_RUN = ["--seq_len", "64", "--batch_size", "4", "--total_batch_size", "512",
                "--hellaswag_every", "0", "--num_samples", "0", "--val_tokens", "4096"]


def transformers_val_loss(hf, val_shard, seq_len=64, val_tokens=4096) -> float:
    """transformers' mean cross-entropy over the val sequences gpt2.evaluate_loss reads."""
    tokens = torch.from_numpy(gpt2.read_shard(val_shard).astype(np.int64))
    n = val_tokens // seq_len
    rows = torch.stack([tokens[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])  # (n, T+1)
    with torch.no_grad():
        logits = hf(rows[:, :-1]).logits  # (n, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()


def first_val_loss(log_dir) -> float:
    return next(e["val_loss"] for e in training.read_events(log_dir) if "val_loss" in e)


def test_init_from_a_transformers_folder_or_our_checkpoint_starts_at_transformers_val_loss(
        shakespeare, tmp_path):
    hf = hf_model(n_layer=2, n_head=4, n_embd=64, vocab_size=gpt2.VOCAB_SIZE, n_positions=128)
    hf.save_pretrained(tmp_path / "hf")
    val_shard = shakespeare / "shakespeare_val_000000.bin"
    common = ["--data_dir", shakespeare, *FINETUNE_RUN, "--max_steps", "1", "--eval_every", "1",
              "--block_size", "64"]  # cropped from the source's 128 positions
    cli.main([*common, "--init_from", tmp_path / "hf", "--log_dir", tmp_path / "a"])
    assert first_val_loss(tmp_path / "a") == pytest.approx(transformers_val_loss(hf, val_shard), abs=1e-4)
    # The checkpoint after one step, as a starting point: transformers, given its export, agrees.
    ckpt = tmp_path / "a/ckpt_00000001.pt"
    cli.main(["export", "--checkpoint", ckpt, "--out", tmp_path / "exported"])
    stepped = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    cli.main([*common, "--init_from", ckpt, "--log_dir", tmp_path / "b"])
    assert first_val_loss(tmp_path / "b") == pytest.approx(transformers_val_loss(stepped, val_shard), abs=1e-4)
    assert first_val_loss(tmp_path / "b") != pytest.approx(first_val_loss(tmp_path / "a"), abs=1e-4)


def test_init_from_refuses_size_flags_and_a_longer_context_with_one_line(shakespeare, tmp_path, run_main):
    hf_model(vocab_size=gpt2.VOCAB_SIZE, n_positions=64).save_pretrained(tmp_path / "hf")
    common = ["--data_dir", shakespeare, "--log_dir", tmp_path, *FINETUNE_RUN, "--init_from", tmp_path / "hf"]
    for size_flag in (["--n_layer", "4"], ["--model", "mini"]):
        assert_one_error_line(run_main(cli.main, *common, *size_flag), "--init_from takes the architecture from its source")
    err = assert_one_error_line(run_main(cli.main, *common, "--block_size", "128"))
    assert f"--block_size 128 > {tmp_path / 'hf'}'s 64" in err


def test_a_fine_tune_on_a_txt_learns_resumes_exactly_and_exports_to_transformers(tmp_path, samples):
    # Your text -> shards (10% of its tokens for validation), then OpenAI-style weights -> fine-tune.
    assert fineweb.main(["--input", str(samples / "tinyshakespeare.txt"),
                         "--out_dir", str(tmp_path / "data"), "--num_proc", "1"]) in (0, None)
    hf_model(n_layer=2, n_head=4, n_embd=64, vocab_size=gpt2.VOCAB_SIZE).save_pretrained(tmp_path / "hf")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--data_dir", tmp_path / "data", *FINETUNE_RUN, "--init_from", tmp_path / "hf",
              "--max_steps", "6", "--eval_every", "6", "--checkpoint_every", "3",
              "--keep_checkpoints", "5", "--max_lr", "3e-3", "--warmup_steps", "0", "--dropout", "0.1"]
    cli.main([*common, "--log_dir", full])
    val = [e["val_loss"] for e in training.read_events(full) if "val_loss" in e]
    assert val[1] < val[0] - 0.5  # it learns Shakespeare
    resumed.mkdir()
    (resumed / "ckpt_00000003.pt").write_bytes((full / "ckpt_00000003.pt").read_bytes())
    (tmp_path / "hf").rename(tmp_path / "hf_gone")  # a resumed fine-tune never reads its source
    cli.main([*common, "--log_dir", resumed, "--resume"])
    a = torch.load(full / "ckpt_00000006.pt", weights_only=True)["model"]
    b = torch.load(resumed / "ckpt_00000006.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # dropout's masks included: the RNG resumed
    cli.main(["export", "--checkpoint", full / "ckpt_00000006.pt", "--out", tmp_path / "out"])
    ours = gpt2.load_checkpoint_model(full / "ckpt_00000006.pt").eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = random_tokens(gpt2.VOCAB_SIZE)
    torch.testing.assert_close(ours(idx)[0], hf_logits(hf, idx), atol=1e-4, rtol=0)
    assert hf.config.vocab_size == gpt2.VOCAB_SIZE  # the padding rows stay ours


def test_dropout_changes_training_but_not_evaluation_or_greedy_generation(shakespeare, tmp_path):
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16)
    plain = GPT(config)
    dropped = GPT(GPTConfig(**{**asdict(config), "dropout": 0.1}))
    dropped.load_state_dict(plain.state_dict())
    idx = random_tokens(64, (2, 16))
    plain.eval(), dropped.eval()
    assert torch.equal(plain(idx)[0], dropped(idx)[0])
    assert torch.equal(gpt2.generate(plain, idx, 8, temperature=0),
                       gpt2.generate(dropped, idx, 8, temperature=0))
    plain.train(), dropped.train()
    assert torch.equal(plain(idx, idx)[1], plain(idx, idx)[1])  # no randomness without dropout
    assert not torch.equal(dropped(idx, idx)[1], dropped(idx, idx)[1])
    runs = {}
    for p in ("0", "0.1"):
        cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path / p, *TINY_RUN,
                   "--max_steps", "2", "--dropout", p])
        runs[p] = train_losses(tmp_path / p)
    assert runs["0"][0] != runs["0.1"][0]


# -- Nothing lost, nothing silently wrong: preemption, reruns, bad flags, bad files, faults -------

def final_weights(log_dir, step):
    return torch.load(checkpoints.Checkpoints(log_dir).path(step), weights_only=True)["model"]


LONG_RUN = [*TINY_RUN, "--max_steps", "8", "--checkpoint_every", "100", "--eval_every", "100",
            "--dropout", "0.1", "--device", "cpu"]


@contextlib.contextmanager
def torch_on_one_thread():
    """torch on one thread in this process, as in the runs in the background (OMP_NUM_THREADS=1):
    the same kernels, so the same arithmetic to the bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(shakespeare, tmp_path_factory):
    """LONG_RUN's final weights, uninterrupted (with dropout: the random generators count)."""
    log_dir = tmp_path_factory.mktemp("uninterrupted")
    with torch_on_one_thread():
        cli.main(["--data_dir", shakespeare, "--log_dir", log_dir, *LONG_RUN])
    return final_weights(log_dir, 8)


def assert_stopped_then_resumed(stopped, signal_name, data_dir, log_dir, uninterrupted, run_main):
    """`stopped` (exit code, stdout, stderr) is a run of LONG_RUN stopped by `signal_name` after
    step 2 or later: it says so in one line naming its checkpoint, and --resume from that
    checkpoint ends with the uninterrupted run's weights, each step logged once."""
    code, _, err = stopped
    assert code == 128 + getattr(signal, signal_name), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stopped: {signal_name} after step "), err
    stopped_at = checkpoints.Checkpoints.step_of(checkpoints.Checkpoints(log_dir).list()[-1])
    assert 3 <= stopped_at < 8 and f"saved {checkpoints.Checkpoints(log_dir).path(stopped_at)}" in lines[0]
    with torch_on_one_thread():
        assert run_main(cli.main, "--data_dir", data_dir, "--log_dir", log_dir, *LONG_RUN,
                   "--resume")[0] == 0
    resumed = final_weights(log_dir, 8)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    steps = [e["step"] for e in training.read_events(log_dir) if "loss" in e]
    assert steps == list(range(8))  # each step logged once, across the stop


def test_sigterm_to_a_running_gpt2_py_saves_a_checkpoint_and_resume_ends_with_the_uninterrupted_weights(
        shakespeare, tmp_path, uninterrupted, run_main):
    # The whole way, as a cluster does it: another process sends the signal to a running run.
    run = run_in_background("--data_dir", shakespeare, "--log_dir", tmp_path, *LONG_RUN)
    wait_for_step(tmp_path, 2, run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=300)
    assert_stopped_then_resumed((run.returncode, "", err), "SIGTERM", shakespeare, tmp_path,
                                uninterrupted, run_main)


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint_to_the_uninterrupted_weights(
        shakespeare, tmp_path, uninterrupted, run_main):
    # No handler, no last checkpoint: what a crash or an OOM killer leaves, the newest periodic
    # checkpoint and a log that ran past it.
    common = ["--data_dir", shakespeare, "--log_dir", tmp_path, *LONG_RUN, "--checkpoint_every", "2"]
    run = run_in_background(*common)
    wait_for_step(tmp_path, 5, run)
    run.kill()
    run.communicate(timeout=60)
    assert 4 <= checkpoints.Checkpoints.step_of(checkpoints.Checkpoints(tmp_path).list()[-1]) < 8
    with torch_on_one_thread():
        assert run_main(cli.main, *common, "--resume")[0] == 0
    resumed = final_weights(tmp_path, 8)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    steps = [e["step"] for e in training.read_events(tmp_path) if "loss" in e]
    assert steps == list(range(8))  # the steps logged after the checkpoint, once


@pytest.mark.parametrize("signal_name", ["SIGUSR1", "SIGINT"])
def test_sigusr1_or_one_ctrl_c_saves_a_checkpoint_and_resume_ends_with_the_uninterrupted_weights(
        shakespeare, tmp_path, uninterrupted, run_main, monkeypatch, signal_name):
    # The same handler, in this process: the run signals itself during step 2.
    get_lr = gpt2.get_lr

    def get_lr_and_signal(step, *args):
        if step == 2:
            os.kill(os.getpid(), getattr(signal, signal_name))
        return get_lr(step, *args)

    monkeypatch.setattr(gpt2, "get_lr", get_lr_and_signal)
    with torch_on_one_thread():
        stopped = run_main(cli.main, "--data_dir", shakespeare, "--log_dir", tmp_path, *LONG_RUN)
    monkeypatch.setattr(gpt2, "get_lr", get_lr)
    assert_stopped_then_resumed(stopped, signal_name, shakespeare, tmp_path, uninterrupted, run_main)


def test_a_fresh_run_in_a_folder_that_holds_a_run_is_refused_and_deletes_nothing(
        shakespeare, shared_run, tmp_path, run_main):
    tmp_path = copy_run(shared_run, tmp_path / "run")
    common = ["--data_dir", shakespeare, "--log_dir", tmp_path, *SHARED_RUN]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert_one_error_line(run_main(cli.main, *common), f"{tmp_path} holds a run", "--resume",
                          "--overwrite")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    cli.main([*common, "--overwrite", "--max_steps", "1"])  # on purpose: the old run is gone
    assert [p.name for p in checkpoints.Checkpoints(tmp_path).list()] == ["ckpt_00000001.pt"]
    assert [e["step"] for e in training.read_events(tmp_path) if "loss" in e] == [0]


def test_rotation_keeps_the_newest_and_never_a_checkpoint_of_a_later_step(tmp_path):
    for step in (2, 4, 6, 10):
        checkpoints.Checkpoints(tmp_path).path(step).write_bytes(b"x")
    checkpoints.Checkpoints(tmp_path, keep=2).rotate(checkpoints.Checkpoints(tmp_path).path(6))
    assert [p.name for p in checkpoints.Checkpoints(tmp_path).list()] == [
        "ckpt_00000004.pt", "ckpt_00000006.pt", "ckpt_00000010.pt"]


HOLD_THE_LOCK = """import sys, time, plumbing
with plumbing.exclusive_lock(sys.argv[1], busy="held by another"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_the_same_log_dir_is_refused_while_the_first_runs(shakespeare, tmp_path, run_main):
    # The first run, as far as the log_dir is concerned: a process holding its lock (one that
    # imports no torch, so it starts in a moment), killed as a crash would kill it.
    first = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, tmp_path / ".lock"], cwd=HERE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "held\n"
        assert_one_error_line(run_main(cli.main, "--data_dir", shakespeare, "--log_dir", tmp_path,
                                  *TINY_RUN, "--resume"), f"another run is using {tmp_path}")
    finally:
        first.kill()
        first.communicate()
    (tmp_path / "ckpt_00000005.pt.4242.0123abcd.tmp").write_bytes(b"half a checkpoint")
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path, *TINY_RUN, "--max_steps", "1",
               "--resume"])  # the killed run left its lock behind? no: the OS dropped it
    assert not list(tmp_path.glob("*.tmp"))  # and the dead run's half-written file is gone


def test_an_inf_gradient_stops_before_the_optimizer_step_and_writes_no_checkpoint(
        shakespeare, tmp_path, run_main, monkeypatch):
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_with_an_inf_gradient_at_step_3(parameters, max_norm):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == 4:  # step 3, counting from 0; in float32 no scaler skips it
            parameters[0].grad[0, 0] = float("inf")
        return clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_with_an_inf_gradient_at_step_3)
    err = assert_one_error_line(run_main(cli.main, "--data_dir", shakespeare, "--log_dir", tmp_path,
                                    *TINY_RUN, "--max_steps", "6", "--checkpoint_every", "1",
                                    "--keep_checkpoints", "10"))
    assert "gradient norm is inf at step 3: stopping before the optimizer step" in err
    assert err.endswith(f"last good checkpoint: {checkpoints.Checkpoints(tmp_path).path(3)}")
    assert [checkpoints.Checkpoints.step_of(p) for p in checkpoints.Checkpoints(tmp_path).list()] == [1, 2, 3]
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path, 3).values())


def test_a_checkpoint_with_a_flipped_byte_or_nan_weights_is_refused_with_one_line(
        shakespeare, shared_run, tmp_path, run_main):
    tmp_path = copy_run(shared_run, tmp_path / "run", until=2)
    common = ["--data_dir", shakespeare, "--log_dir", tmp_path, *SHARED_RUN]
    path = checkpoints.Checkpoints(tmp_path).path(2)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 1  # torch.load alone would load this, a wrong weight and all
    path.write_bytes(bytes(flipped))
    assert_one_error_line(run_main(cli.main, *common, "--resume", "--max_steps", "3"), str(path),
                          "corrupt checkpoint (the CRC of")
    state = torch.load(io.BytesIO(good), weights_only=True)
    state["model"]["transformer.wpe.weight"][0, 0] = float("nan")
    torch.save(state, path)
    assert_one_error_line(run_main(cli.main, *common, "--resume", "--max_steps", "3"), str(path),
                          "NaN or infinite weights")
    assert_one_error_line(run_main(cli.main, "sample", "--checkpoint", path), "NaN or infinite")


def test_a_checkpoint_older_than_a_config_field_loads_and_one_from_a_newer_config_is_one_line(
        shared_run, tmp_path, run_main):
    state = torch.load(checkpoints.Checkpoints(shared_run).path(6), weights_only=True)
    del state["config"]["dropout"]  # as if saved before GPTConfig had it
    torch.save(state, tmp_path / "old.pt")
    model = gpt2.load_checkpoint_model(tmp_path / "old.pt")
    assert model.config.dropout == GPTConfig().dropout
    state["config"]["rope"] = True  # a field this gpt2.py does not know
    torch.save(state, tmp_path / "new.pt")
    assert_one_error_line(run_main(cli.main, "sample", "--checkpoint", tmp_path / "new.pt"),
                          "fields this gpt2.py lacks: rope")


def test_a_foreign_checkpoint_or_a_log_dir_that_is_a_file_is_one_line(shakespeare, tmp_path, run_main):
    nanogpt = {"model": {}, "optimizer": {}, "model_args": {"n_layer": 2}, "iter_num": 5,
               "best_val_loss": 3.0, "config": {"out_dir": "out", "eval_interval": 2000}}
    (tmp_path / "run").mkdir()
    torch.save(nanogpt, tmp_path / "run/ckpt_00000005.pt")
    common = ["--data_dir", shakespeare, *TINY_RUN, "--max_steps", "6"]
    for result in (run_main(cli.main, *common, "--log_dir", tmp_path / "run", "--resume"),
                   run_main(cli.main, "sample", "--checkpoint", tmp_path / "run/ckpt_00000005.pt")):
        assert_one_error_line(result, "not a checkpoint of gpt2.py")
    (tmp_path / "file").write_text("not a folder")
    assert_one_error_line(run_main(cli.main, *common, "--log_dir", tmp_path / "file"),
                          f"--log_dir {tmp_path / 'file'} is a file")


def test_a_full_disk_during_a_checkpoint_write_names_the_file_and_the_intact_one(
        shakespeare, tmp_path, run_main, monkeypatch):
    fsync, writes = os.fsync, []

    def fsync_on_a_disk_that_fills_up(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".pt." in name:
            writes.append(name)
            if len(writes) == 2:  # the second checkpoint finds the disk full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_on_a_disk_that_fills_up)
    err = assert_one_error_line(run_main(cli.main, "--data_dir", shakespeare, "--log_dir", tmp_path,
                                    *TINY_RUN, "--max_steps", "4", "--checkpoint_every", "2"))
    assert f"cannot write {checkpoints.Checkpoints(tmp_path).path(4)} (No space left on device)" in err
    assert f"the previous checkpoint, {checkpoints.Checkpoints(tmp_path).path(2)}, is intact" in err
    assert [p.name for p in tmp_path.iterdir() if ".pt" in p.name] == ["ckpt_00000002.pt"]
    checkpoints.Checkpoints.load(checkpoints.Checkpoints(tmp_path).path(2))


def test_resuming_on_other_data_under_the_same_shard_names_is_refused(shakespeare, shared_run,
                                                                     tmp_path, run_main):
    data = tmp_path / "data"
    shutil.copytree(shakespeare, data)
    common = ["--data_dir", data, "--log_dir", copy_run(shared_run, tmp_path / "log", until=2),
              *SHARED_RUN]
    train = data / "shakespeare_train_000001.bin"
    write_shard(train, gpt2.read_shard(train)[::-1].copy())  # same name, same size, other text
    assert_one_error_line(run_main(cli.main, *common, "--resume", "--max_steps", "3"),
                          "cannot resume", "other shards under the same names")


@pytest.mark.parametrize("val_tokens, flags, message", [
    (10, [], "10 tokens, fewer than one sequence of --seq_len 64 + 1"),
    (0, [], "0 tokens, fewer than one sequence"),
    (5000, ["--val_tokens", "32"], "--val_tokens 32 < --seq_len 64"),
])
def test_a_val_split_too_short_for_one_sequence_is_one_line_at_start(
        shakespeare, tmp_path, run_main, val_tokens, flags, message):
    data = tmp_path / "data"
    shutil.copytree(shakespeare, data)
    write_shard(data / "shakespeare_val_000000.bin", gpt2.read_shard(
        shakespeare / "shakespeare_val_000000.bin")[:val_tokens].copy())
    assert_one_error_line(run_main(cli.main, "--data_dir", data, "--log_dir", tmp_path / "log",
                              *TINY_RUN, "--max_steps", "1", *flags), message)
    assert not (tmp_path / "log/log.jsonl").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_token_id_outside_the_vocabulary_is_named_with_its_shard(shakespeare, tmp_path, run_main, split):
    data = tmp_path / "data"
    shutil.copytree(shakespeare, data)
    shard = next(data.glob(f"*_{split}_*.bin"))
    tokens = gpt2.read_shard(shard).copy()
    tokens[100] = 50300  # a padding row of the 50,304-row table
    write_shard(shard, tokens)
    assert_one_error_line(run_main(cli.main, "--data_dir", data, "--log_dir", tmp_path / "log",
                              *TINY_RUN, "--max_steps", "1"),
                          f"{shard}: token id 50300 is not one of GPT-2's 50257 tokens")


ZERO_IS_WRONG = ["--batch_size", "--seq_len", "--total_batch_size", "--eval_every",
                 "--checkpoint_every", "--n_head", "--n_layer", "--n_embd", "--block_size",
                 "--num_epochs", "--keep_checkpoints", "--val_tokens", "--sample_tokens",
                 "--pad_vocab_to_multiple_of"]
ZERO_IS_FINE = ["--max_steps", "--warmup_steps", "--hellaswag_every", "--hellaswag_limit",
                "--num_samples", "--seed"]


@pytest.mark.parametrize("argv", [
    *[[flag, "0"] for flag in ZERO_IS_WRONG], *[[flag, "-1"] for flag in ZERO_IS_WRONG + ZERO_IS_FINE],
    ["--loss_chunk", "-2"], ["--dropout", "1"], ["--dropout", "-0.1"], ["--max_lr", "0"],
    ["--min_lr_ratio", "1.5"], ["--grad_clip", "0"], ["--dist_timeout", "0"],
    *[["sample", flag, "0"] for flag in ("--max_new_tokens", "--num_samples", "--top_k")],
    ["sample", "--top_p", "0"], ["sample", "--top_p", "1.5"], ["sample", "--temperature", "-1"],
    ["sample", "--seed", "-1"], ["bench", "--reps", "0"], ["bench", "--batch_size", "-1"],
    ["--batch_size", "many"],
])
def test_a_flag_out_of_its_range_is_one_line(run_main, argv):
    flag = next(a for a in argv if a.startswith("--"))
    assert_one_error_line(run_main(cli.main, *argv), f"argument {flag}")


def test_after_a_resume_the_log_holds_each_step_and_evaluation_once(shakespeare, shared_run, tmp_path):
    full = shared_run  # evaluated at steps 0, 4 and 6
    resumed = copy_run(full, tmp_path / "resumed", until=4)  # as if killed after step 6's log line
    cli.main(["--data_dir", shakespeare, *SHARED_RUN, "--log_dir", resumed, "--resume"])
    strip = lambda events: [{k: v for k, v in e.items() if k not in ("ms", "tokens_per_s")}
                            for e in events]
    assert strip(training.read_events(resumed)) == strip(training.read_events(full))


def failing_rank_script(tmp_path, exception="RuntimeError"):
    """A launcher that runs gpt2.py with rank 1 raising at the start of step 2 (its get_lr)."""
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(HERE)!r})
import cli, gpt2
real_get_lr = gpt2.get_lr
def get_lr(step, *args):
    if step == 2 and os.environ["RANK"] == "1":
        raise {exception}("injected failure on rank 1")
    return real_get_lr(step, *args)
gpt2.get_lr = get_lr
cli.main(sys.argv[1:])
""")
    return script


def two_nodes(script, node_args, timeout=300):
    """torchrun, one process on each of two "nodes" on 127.0.0.1; node_args[r] are node r's
    flags. Returns [(exit code, output, seconds)] of both."""
    rendezvous = ["--nnodes=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    start = time.monotonic()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous,
                               f"--node_rank={rank}", "--nproc_per_node=1", str(script),
                               *map(str, node_args[rank])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    results = []
    for node in nodes:
        out, _ = node.communicate(timeout=timeout)
        results.append((node.returncode, out, time.monotonic() - start))
    return results


def test_a_rank_that_raises_ends_every_node_promptly_with_its_message(shakespeare, tmp_path):
    common = ["--data_dir", shakespeare, *TINY_RUN, "--max_steps", "6", "--device", "cpu",
              "--dist_timeout", "3600"]  # an hour: it must not be what ends the run
    script = failing_rank_script(tmp_path)
    results = two_nodes(script, [[*common, "--log_dir", tmp_path / f"node{r}"] for r in (0, 1)])
    for code, out, _ in results:
        assert code != 0, out
        assert "rank 1: RuntimeError: injected failure on rank 1" in out, out
    assert "Traceback" in results[1][1]  # a bug's traceback, on the rank it hit
    assert max(seconds for _, _, seconds in results) < 180  # start-up included; not an hour


def test_nodes_with_other_data_stop_with_one_line(shakespeare, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(shakespeare, other)
    train = other / "shakespeare_train_000001.bin"
    write_shard(train, gpt2.read_shard(train)[::-1].copy())
    common = [*TINY_RUN, "--max_steps", "2", "--device", "cpu"]
    results = two_nodes(HERE / "gpt2.py", [[*common, "--data_dir", data, "--log_dir", tmp_path / f"n{r}"]
                                           for r, data in enumerate((shakespeare, other))])
    for code, out, _ in results:
        assert code == 1 and "rank(s) [1] see other training shards" in out, out


def test_after_a_resume_the_checkpoint_is_not_kept_in_memory(shakespeare, shared_run, tmp_path,
                                                             monkeypatch):
    log_dir = copy_run(shared_run, tmp_path / "run", until=2)
    common = ["--data_dir", shakespeare, "--log_dir", log_dir, *SHARED_RUN]
    load, loaded, alive_at_step = checkpoints.Checkpoints.load, [], []

    def load_and_watch(path, *args, **kwargs):
        state = load(path, *args, **kwargs)
        loaded.append(weakref.ref(state["model"]["transformer.wpe.weight"]))
        return state

    write = training.EventLog.write

    def write_and_look(self, **event):
        if "loss" in event:
            gc.collect()
            alive_at_step.append(loaded[0]() is not None)
        return write(self, **event)

    monkeypatch.setattr(checkpoints.Checkpoints, "load", staticmethod(load_and_watch))
    monkeypatch.setattr(training.EventLog, "write", write_and_look)
    cli.main([*common, "--max_steps", "3", "--resume"])
    assert alive_at_step == [False]  # one step after the resume, the loaded copy is gone


# -- The first GPU run: what a CPU can show of it ------------------------------------------------

def fits_up_to(limit):
    """A stand-in for micro_batch_fits: this "GPU" holds micro-batches of up to `limit`."""
    return lambda train_model, batch_size, args, runtime: batch_size <= limit


def test_the_readme_two_node_command_gets_a_valid_split_of_16_processes(monkeypatch):
    line = next(line for line in (HERE / "README.md").read_text().splitlines() if "--nnodes=2" in line)
    command = line[line.index("torchrun"):].strip("` ")
    flags = command.split()[command.split().index("gpt2.py") + 1:]
    cfg = TrainConfig.from_flags(vars(cli.train_parser().parse_args(flags)))
    nodes = int(re.search(r"--nnodes=(\d+)", command)[1])
    world = nodes * int(re.search(r"--nproc_per_node=(\d+)", command)[1])
    assert world == 16
    monkeypatch.setattr(gpt2, "micro_batch_fits", fits_up_to(64))  # an 80 GB GPU
    monkeypatch.setattr(parallel, "smallest_over_ranks", lambda value, runtime: value)  # no 16 ranks here
    B, T = gpt2.fitting_batch_size(None, cfg, gpt2.Runtime(world_size=world)), cfg.recipe.seq_len
    assert B * T * world * training.accumulation_steps(cfg.recipe.total_batch_size, B, T, world) == 2 ** 19
    assert B == 32  # 64 would make 2**20 tokens a step


def test_a_micro_batch_that_does_not_divide_the_step_is_refused_with_one_that_does(shakespeare,
                                                                                   tmp_path, run_main):
    err = assert_one_error_line(run_main(cli.main, "--data_dir", shakespeare, "--log_dir", tmp_path,
                                    *TINY_RUN, "--batch_size", "3"))
    assert err.endswith("--batch_size 2 divides it (or --batch_size auto)")


def test_batch_size_auto_keeps_the_total_and_agrees_across_2_gloo_ranks(two_ranks_run):
    out, full, _ = two_ranks_run
    assert "--batch_size auto: 2 sequences per micro-batch" in out, out
    assert "512 tokens/step = 2 x 64 x 2 accum x 2" in out, out  # the step stays 512 tokens
    assert len(train_losses(full)) == 4


def test_with_dropout_each_rank_draws_its_own_masks_and_a_2_process_resume_is_exact(
        two_ranks_run):
    _, full, resumed = two_ranks_run
    rng = torch.load(checkpoints.Checkpoints(full).path(2), weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    a, b = final_weights(full, 4), final_weights(resumed, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(resumed) == train_losses(full)[2:]


def test_a_gpu_out_of_memory_is_one_line_that_names_the_batch_size(shakespeare, tmp_path, run_main,
                                                                   monkeypatch):
    def forward_that_runs_out_of_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.14 GiB")

    monkeypatch.setattr(gpt2.GPT, "forward", forward_that_runs_out_of_memory)
    assert_one_error_line(run_main(cli.main, "--data_dir", shakespeare, "--log_dir", tmp_path,
                              *TINY_RUN, "--max_steps", "1"),
                          "out of GPU memory: lower --batch_size (or use --batch_size auto)")


@pytest.mark.parametrize("triton, capability, expected", [
    (False, (9, 0), "Triton is not installed"), (True, (6, 0), "Triton needs compute capability 7.0"),
    (True, (7, 0), None)])
def test_compile_auto_is_off_where_triton_cannot_run(monkeypatch, capsys, triton, capability,
                                                     expected):
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda *a: None)
    monkeypatch.setattr(gpt2.importlib.util, "find_spec", lambda name: object() if triton else None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert gpt2.speed_settings("auto", -1, torch.device("cuda"))["compile"] is (expected is None)
    err = capsys.readouterr().err
    assert (expected in err) if expected else err == ""


def test_the_batch_handed_to_to_device_is_one_contiguous_window(shakespeare, tmp_path, monkeypatch):
    handed = []
    to_device = gpt2.to_device
    monkeypatch.setattr(gpt2, "to_device", lambda t, device: handed.append(t) or to_device(t, device))
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path, *TINY_RUN, "--max_steps", "2"])
    assert len(handed) == 4 and all(t.is_contiguous() and t.shape == (4, 65) for t in handed)  # 2 x 2


def test_a_forced_bf16_on_a_gpu_without_it_warns(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # a T4
    assert parallel.pick_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    assert "warning: --dtype bfloat16 on a GPU of compute capability 7.5: emulated" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    parallel.pick_dtype("bfloat16", torch.device("cuda"))
    assert capsys.readouterr().err == ""


def test_the_kv_cache_is_kept_in_the_dtype_autocast_computes_in():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    cache = gpt2.KVCache(model.config, 1, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.hidden(torch.zeros(1, 4, dtype=torch.long), cache)
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16


def test_the_tools_make_their_gpu_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda *a: None)
    runtime = tools.tool_runtime("cuda:1")
    assert chosen == [torch.device("cuda", 1)] and runtime.dtype == torch.bfloat16


def test_training_refuses_a_data_folder_fineweb_py_has_not_finished(tmp_path, samples, run_main,
                                                                   disk_full_at):
    disk_full_at("_000003.bin")
    data = tmp_path / "data"
    assert fineweb.main(["--input", str(samples / "tinyshakespeare.txt"), "--out_dir", str(data),
                         "--shard_size", "40000", "--num_proc", "1"]) == 1
    assert len(list(data.glob("*_train_*.bin"))) == 2  # enough to train on, silently, before
    assert_one_error_line(run_main(cli.main, "--data_dir", data, "--log_dir", tmp_path / "log",
                              *TINY_RUN, "--max_steps", "1"), f"{data} is not finished")


# -- Sharded training (FSDP2) and activation checkpointing, on CPU processes over gloo ------------

SHARDED_RUN = [*TINY_RUN, "--batch_size", "2", "--max_steps", "6", "--checkpoint_every", "3",
               "--keep_checkpoints", "5", "--device", "cpu", "--num_samples", "1"]


@pytest.fixture(scope="module")
def sharded_and_plain(shakespeare, tmp_path_factory):
    """The same 6 steps as 2 FSDP processes (2 micro-batches of 2 each a step) and as 1 plain
    process (4 micro-batches of 2): their log folders."""
    root = tmp_path_factory.mktemp("fsdp")
    common = ["--data_dir", shakespeare, *SHARDED_RUN]
    cli.main([*common, "--log_dir", root / "plain"])
    finish(torchrun(*common, "--log_dir", root / "fsdp", "--fsdp", extra=["--standalone"]))
    return root


def test_fsdp_on_2_processes_matches_1_process_step_by_step_and_in_the_final_weights(
        sharded_and_plain):
    plain, fsdp = sharded_and_plain / "plain", sharded_and_plain / "fsdp"
    # float32; the sums of sharded gradients and norms run in another order: 1e-5 of noise
    np.testing.assert_allclose(train_losses(fsdp), train_losses(plain), atol=1e-5, rtol=0)
    val = [[e["val_loss"] for e in training.read_events(d) if "val_loss" in e] for d in (fsdp, plain)]
    np.testing.assert_allclose(*val, atol=1e-5, rtol=0)
    a, b = final_weights(fsdp, 6), final_weights(plain, 6)
    assert a.keys() == b.keys()  # one checkpoint format, plain names, the tie kept
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=0) for k in a)
    samples = [next(e["samples"] for e in training.read_events(d) if "samples" in e) for d in (fsdp, plain)]
    assert samples[0] == samples[1]  # evaluation and sampling from the gathered copy


def test_fsdp_on_2_processes_holds_half_the_parameters_gradients_and_adamw_moments_on_each(
        sharded_and_plain):
    memory = {mode: next(e["memory_mib"] for e in training.read_events(sharded_and_plain / mode)
                         if "memory_mib" in e) for mode in ("plain", "fsdp")}
    plain, fsdp = memory["plain"], memory["fsdp"]
    assert plain["gradients"] == plain["parameters"]
    assert plain["optimizer"] == pytest.approx(2 * plain["parameters"], rel=1e-3)  # two moments
    for part in ("parameters", "gradients", "optimizer"):
        assert fsdp[part] == pytest.approx(plain[part] / 2, rel=1e-2), part
    assert fsdp["peak"] > 0


def test_an_fsdp_checkpoint_resumes_exactly_under_fsdp_and_alike_in_1_process_or_under_ddp(
        shakespeare, sharded_and_plain, tmp_path):
    fsdp = sharded_and_plain / "fsdp"
    common = ["--data_dir", shakespeare, *SHARDED_RUN]
    for mode in ("fsdp", "single", "ddp"):
        (tmp_path / mode).mkdir()
        shutil.copy(checkpoints.Checkpoints(fsdp).path(3), tmp_path / mode)
    finish(torchrun(*common, "--log_dir", tmp_path / "fsdp", "--fsdp", "--resume", extra=["--standalone"]))
    cli.main([*common, "--log_dir", tmp_path / "single", "--resume"])
    finish(torchrun(*common, "--log_dir", tmp_path / "ddp", "--resume", extra=["--standalone"]))
    uninterrupted = final_weights(fsdp, 6)
    resumed = final_weights(tmp_path / "fsdp", 6)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    for mode in ("single", "ddp"):
        np.testing.assert_allclose(train_losses(tmp_path / mode), train_losses(fsdp)[3:],
                                   atol=1e-5, rtol=0)


def test_activation_checkpointing_gives_the_same_losses_and_gradients_with_dropout(shakespeare,
                                                                                 tmp_path):
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32,
                              dropout=0.1))
        if recompute:
            parallel.recompute_activations(model)
        torch.manual_seed(1)  # the same dropout masks, if the recomputation replays them
        idx = random_tokens(256, (2, 32))
        _, loss = model(idx, idx)
        loss.backward()
        grads.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, g0), (loss1, g1) = grads
    assert loss0 == loss1 and all(torch.equal(g0[n], g1[n]) for n in g0)
    runs = {}
    for flags in ([], ["--activation_checkpointing"]):
        log_dir = tmp_path / ("ac" if flags else "plain")
        cli.main(["--data_dir", shakespeare, "--log_dir", log_dir, *TINY_RUN, "--max_steps", "3",
                   "--dropout", "0.1", *flags])
        runs[bool(flags)] = train_losses(log_dir)
    assert runs[True] == runs[False]


def test_fsdp_refuses_batch_size_auto_with_one_line(shakespeare, tmp_path, run_main):
    # refused before any collective: one process shows it
    assert_one_error_line(run_main(cli.main, "--data_dir", shakespeare, "--log_dir", tmp_path, *TINY_RUN,
                              "--batch_size", "auto", "--fsdp", "--device", "cpu"),
                          "--fsdp needs a --batch_size")


# -- Muon for the blocks' matrices (--optimizer muon) --------------------------------------------

def test_muon_takes_exactly_the_blocks_four_matrices_by_name_and_adamw_the_rest():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=16))
    optimizer = gpt2.configure_optimizer(model, 1e-3, 0.1, dict(muon_lr=0.02, momentum=0.95,
                                                                weight_decay=0.0, split_qkv=True))
    names = {p: n for n, p in model.named_parameters()}
    muon = {names[p] for g in optimizer.muon.param_groups for p in g["params"]}
    assert muon == {f"transformer.h.{i}.{m}" for i in range(3) for m in gpt2.CONV1D_WEIGHTS}
    split = {names[p] for g in optimizer.muon.param_groups if g.get("split") == 3 for p in g["params"]}
    assert split == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)}
    adamw = [names[p] for g in optimizer.adamw.param_groups for p in g["params"]]
    assert "transformer.wte.weight" in adamw and "transformer.wpe.weight" in adamw  # 2-D, not Muon's
    assert len(adamw) + len(muon) == len(list(model.parameters()))  # the tied weight once
    assert all(g["lr_scale"] == pytest.approx(20) for g in optimizer.muon.param_groups)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon: torch >= 2.9")
def test_muon_step_is_torchs_step_bit_for_bit_in_bfloat16_and_close_in_float32():
    torch.manual_seed(0)
    weights = [torch.randn(96, 32), torch.randn(32, 128), torch.randn(48, 48)]  # tall, wide, square
    runs = {}
    for name in ("torch", "bfloat16", "float32"):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = torch.optim.Muon(params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01)
        for step in range(3):  # the momentum buffer carries over
            for p, w in zip(params, weights):
                p.grad = torch.sin(w * (step + 1))
            if name == "torch":
                optimizer.step()
            else:
                muon.muon_step(optimizer, getattr(torch, name))
        runs[name] = [p.detach() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(runs["bfloat16"], runs["torch"]))
    moved = [(a - w).abs().max() for a, w in zip(runs["torch"], weights)]
    for a, b, m in zip(runs["float32"], runs["torch"], moved):
        assert (a - b).abs().max() < 0.05 * m  # bfloat16's rounding, not another update


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon: torch >= 2.9")
def test_muon_step_split_3_is_torchs_step_on_q_k_and_v_as_three_parameters():
    torch.manual_seed(0)
    qkv = torch.randn(96, 32)  # c_attn's shape for n_embd 32: Q, K, V stacked
    fused = torch.nn.Parameter(qkv.clone())
    parts = [torch.nn.Parameter(w.clone()) for w in qkv.chunk(3)]
    settings = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01)
    ours = torch.optim.Muon([{"params": [fused], "split": 3}], **settings)
    torchs = torch.optim.Muon(parts, **settings)
    for step in range(3):
        grad = torch.sin(qkv * (step + 1))
        fused.grad = grad.clone()
        for p, g in zip(parts, grad.chunk(3)):
            p.grad = g.clone()
        muon.muon_step(ours, torch.bfloat16)
        torchs.step()
    assert torch.equal(fused.detach(), torch.cat([p.detach() for p in parts]))


def test_the_checkpoint_names_its_optimizer_and_resuming_with_another_is_refused_in_one_line():
    # --optimizer in the checkpoint's flags decides, whatever its state looks like; a
    # checkpoint from before the flag existed was AdamW's.
    # Both layouts: the sections (config.py) and the flat flags of older checkpoints.
    for saved, trained_with, ours in (
            ({"args": {"optimizer": "adamw"}}, "adamw", "muon"), ({"args": {}}, "adamw", "muon"),
            ({"args": {"optimizer": "muon"}}, "muon", "adamw"),
            ({"train_config": {"version": 1, "optimizer": {"optimizer": "muon"}}}, "muon", "adamw"),
            ({"train_config": {"version": 1}}, "adamw", "muon")):
        cfg = TrainConfig.from_flags(vars(cli.train_parser().parse_args(["--optimizer", ours])))
        with pytest.raises(plumbing.UserError, match=f"trained with --optimizer {trained_with}: resume"):
            checkpoints.changed_flags(cfg, {**saved, "step": 3}, gpt2.Runtime())
    assert list(gpt2.OPTIMIZERS) == cli.train_parser()._option_string_actions["--optimizer"].choices


MUON_RUN = [*TINY_RUN, "--optimizer", "muon", "--max_steps", "6", "--checkpoint_every", "3",
            "--keep_checkpoints", "5"]


def test_muon_resumes_exactly_and_refuses_to_resume_as_adamw_or_with_qkv_whole(shakespeare, tmp_path,
                                                                               run_main):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--data_dir", shakespeare, *MUON_RUN, "--dropout", "0.1"]
    cli.main([*common, "--log_dir", full])
    resumed.mkdir()
    shutil.copy(checkpoints.Checkpoints(full).path(3), resumed)
    cli.main([*common, "--log_dir", resumed, "--resume"])
    assert train_losses(resumed) == train_losses(full)[3:]
    a, b = final_weights(full, 6), final_weights(resumed, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_one_error_line(run_main(cli.main, "--data_dir", shakespeare, "--log_dir", full, *TINY_RUN,
                              "--dropout", "0.1", "--max_steps", "8", "--resume"),
                          "the checkpoint was trained with --optimizer muon: resume with it")
    assert_one_error_line(run_main(cli.main, "--data_dir", shakespeare, "--log_dir", full, *MUON_RUN,
                              "--dropout", "0.1", "--max_steps", "8", "--resume", "--muon_qkv",
                              "whole"), "the checkpoint was trained with --muon_qkv split: resume with it")


@pytest.mark.slow  # torch.compile on a CPU: up to a minute of Inductor's C++ builds
def test_compiled_muon_training_in_float16_scales_saves_plain_keys_evaluates_and_samples(
        shakespeare, tmp_path, run_main):
    # The one CPU compile of the suites, for every fact that needs one.
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path, *MUON_RUN, "--max_steps", "3",
               "--eval_every", "3", "--num_samples", "1", "--dtype", "float16", "--loss_chunk", "0",
               "--compile", "on"])
    losses = train_losses(tmp_path)
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    state = torch.load(tmp_path / "ckpt_00000003.pt", weights_only=True)
    assert state["scaler"]["_growth_tracker"] == 3  # 3 scaled steps of both optimizers, none skipped
    assert not [k for k in state["model"] if "_orig_mod" in k]
    evals = [e for e in training.read_events(tmp_path) if "val_loss" in e]
    assert [e["step"] for e in evals] == [0, 3] and all(e["samples"] for e in evals)
    code, out, err = run_main(cli.main, "sample", "--checkpoint", tmp_path / "ckpt_00000003.pt",
                         "--num_samples", "1", "--max_new_tokens", "5", "--seed", "0")
    assert code == 0 and out.startswith("-" * 80), err


def test_muon_trains_in_bfloat16(shakespeare, tmp_path):
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path, *MUON_RUN, "--max_steps", "3",
               "--dtype", "bfloat16"])  # the CPU's chunked loss: the lm_head in float32
    losses = train_losses(tmp_path)
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]


def test_a_fine_tune_from_a_transformers_folder_with_muon_lowers_the_val_loss(shakespeare, tmp_path):
    hf_model(n_layer=2, n_head=4, n_embd=64, vocab_size=gpt2.VOCAB_SIZE).save_pretrained(tmp_path / "hf")
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path / "log", *FINETUNE_RUN,
               "--init_from", tmp_path / "hf", "--optimizer", "muon", "--max_steps", "6",
               "--eval_every", "6", "--max_lr", "3e-3", "--warmup_steps", "0"])
    val = [e["val_loss"] for e in training.read_events(tmp_path / "log") if "val_loss" in e]
    assert val[1] < val[0] - 0.5
