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
    cached = small_model.generate(prompt, 40, temperature=0)
    uncached = small_model.generate(prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :8], prompt)


def test_top_k_1_is_greedy(small_model):
    prompt = random_tokens(gpt2.VOCAB_SIZE, (2, 8))
    assert torch.equal(small_model.generate(prompt, 12, top_k=1, seed=3),
                       small_model.generate(prompt, 12, temperature=0))


def test_the_same_seed_gives_the_same_samples_and_another_seed_others(small_model):
    prompt = random_tokens(gpt2.VOCAB_SIZE, (2, 8))
    a = small_model.generate(prompt, 16, seed=7)
    assert torch.equal(a, small_model.generate(prompt, 16, seed=7))
    assert not torch.equal(a, small_model.generate(prompt, 16, seed=8))


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


def test_sampling_never_emits_a_padding_id():
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=1, n_embd=16,
                          pad_vocab_to_multiple_of=64))
    with torch.no_grad():
        model.lm_head.weight[100:] = 10.0  # padding rows that would win every draw if scored
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 12, seed=0)
    assert out.max() < 100


def test_tokenizer_works_offline():
    assert tiktoken.get_encoding("gpt2").encode("Hello world") == [15496, 995]


# -- 1c. Downloading OpenAI's weights from the hub (a local server stands in for it) ------------

class HubHandler(http.server.BaseHTTPRequestHandler):
    """Serves files under /openai-community/<name>/resolve/main/<file>, with Range support.
    `drops` counts how many more answers break off halfway through the body."""
    root: Path
    drops = 0

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        path = self.root / parts[1] / parts[-1] if len(parts) == 5 else None
        if path is None or not path.exists():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers["Range"] else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if type(self).drops > 0 and len(body) > 1000:
            type(self).drops -= 1
            self.wfile.write(body[:len(body) // 2])  # ... and hang up
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local "hub" holding a small random GPT-2 under the name gpt2; yields the handler."""
    root = tmp_path / "hub"
    hf = hf_model()
    hf.save_pretrained(root / "gpt2")
    handler = type("Handler", (HubHandler,), {"root": root, "drops": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    handler.hf = hf
    yield handler
    server.shutdown()


def test_from_pretrained_downloads_from_hf_endpoint_and_caches(hub, tmp_path):
    model = GPT.from_pretrained("gpt2")
    idx = random_tokens(512)
    torch.testing.assert_close(model(idx)[0], hf_logits(hub.hf, idx), atol=1e-4, rtol=0)
    cached = tmp_path / "cache/gpt2/hub/openai-community--gpt2/model.safetensors"
    assert cached.exists()
    (hub.root / "gpt2/model.safetensors").unlink()  # the hub is gone: the cache must serve
    GPT.from_pretrained("gpt2")


def test_a_dropped_connection_is_resumed_and_gives_the_right_weights(hub):
    hub.drops = 1
    model = GPT.from_pretrained("gpt2")
    assert hub.drops == 0
    idx = random_tokens(512)
    torch.testing.assert_close(model(idx)[0], hf_logits(hub.hf, idx), atol=1e-4, rtol=0)


def test_a_download_that_keeps_failing_leaves_no_file_in_the_cache(hub, tmp_path):
    hub.drops = 100
    with pytest.raises(gpt2.UserError, match="cannot download"):
        GPT.from_pretrained("gpt2")
    assert not (tmp_path / "cache/gpt2/hub/openai-community--gpt2/model.safetensors").exists()


def test_a_missing_model_on_the_hub_is_a_clear_404(hub):
    with pytest.raises(gpt2.UserError, match=r"gpt2-xl/resolve/main/config.json: HTTP 404"):
        GPT.from_pretrained("gpt2-xl")


# -- 1d. Errors a user can cause: one line, exit 1 ------------------------------------------------

def run_cli(*args, env=None):
    """Run `python gpt2.py ARGS` as a user would; returns (exit code, stdout, stderr)."""
    r = subprocess.run([sys.executable, str(HERE / "gpt2.py"), *map(str, args)],
                       capture_output=True, text=True, env={**os.environ, **(env or {})},
                       cwd=HERE, timeout=600)
    return r.returncode, r.stdout, r.stderr


def cli_error(capsys, *args) -> str:
    """Run gpt2.main(ARGS) in this process; assert it exits 1 with one line; return the line."""
    capsys.readouterr()  # forget what the test printed before
    with pytest.raises(SystemExit) as exit_info:
        gpt2.main(list(map(str, args)))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_an_unknown_model_name_exits_1_with_one_line():
    code, _, err = run_cli("sample", "--model", "gpt5")
    assert code == 1 and "Traceback" not in err
    assert err.strip() == ("error: unknown model 'gpt5': use one of gpt2, gpt2-medium, gpt2-large, "
                           "gpt2-xl or a folder with config.json and model.safetensors")


def test_a_folder_without_the_weights_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert "has no model.safetensors" in cli_error(capsys, "sample", "--model", tmp_path)


def test_a_truncated_safetensors_file_is_named(tmp_path, capsys):
    hf_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert "truncated or malformed" in cli_error(capsys, "sample", "--model", tmp_path)


def test_a_malformed_safetensors_header_is_named(tmp_path, capsys):
    hf_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    assert "malformed safetensors header" in cli_error(capsys, "sample", "--model", tmp_path)


def test_weights_of_the_wrong_shape_are_named(tmp_path, capsys):
    hf_model(n_embd=64).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 32}))
    err = cli_error(capsys, "sample", "--model", tmp_path)
    assert "has shape (192,), the model expects (96,)" in err
