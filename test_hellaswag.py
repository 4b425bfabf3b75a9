"""Tests for hellaswag.py, offline: real HellaSwag rows from samples/, transformers as the
oracle, a local HTTP server standing in for GitHub, torchrun on 127.0.0.1 for two ranks.

Every model here has random weights (no network), built by transformers.GPT2LMHeadModel and
loaded into our GPT through save_pretrained, as OpenAI's weights would be. Random weights are
enough to check the scoring: it must pick, example by example, the ending that transformers'
own logits pick (up to float rounding), whatever the batch, the padding or the number of ranks.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import tiktoken
import torch
from torch.overrides import TorchFunctionMode
from transformers import GPT2LMHeadModel

import checkpoints
import cli
import gpt2
import hellaswag
from conftest import (assert_one_error_line, free_port, random_transformers_gpt2, run_script,
                      saved_for_us)

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def val_file(samples) -> Path:
    return samples / "hellaswag_val_1000.jsonl"


@pytest.fixture(scope="session")
def val_1000(val_file) -> list[dict]:
    return hellaswag.load_examples(file=val_file)


@pytest.fixture(scope="session")
def hf_model() -> GPT2LMHeadModel:
    """The reference implementation, narrow (n_embd 32) because on a CPU the time goes into the
    50,257 logits of every position, and those cost less in a narrow model."""
    return random_transformers_gpt2(n_embd=32, n_positions=256)


@pytest.fixture(scope="session")
def model_folder(hf_model, tmp_path_factory) -> Path:
    return saved_for_us(hf_model, tmp_path_factory.mktemp("random_gpt2"))


@pytest.fixture(scope="session")
def model(model_folder) -> gpt2.GPT:
    """The same weights in our GPT, as `python hellaswag.py --model FOLDER` loads them."""
    return gpt2.load_pretrained(str(model_folder))


ORACLE_ROWS = 250  # of the 1,000: as many near-ties and labels in each position as one needs


@pytest.fixture(scope="session")
def scored(model, val_1000):
    """(labels, pred, pred_norm) of our scoring on the first 250 real rows, computed once.

    Scoring is per example (a test checks that batching changes nothing), so the first n
    entries are also what scoring only the first n examples gives.
    """
    return hellaswag.predict(model, val_1000[:ORACLE_ROWS], "cpu", batch_size=16)


def counts(scored, n: int) -> dict:
    """The counts `evaluate` reports for the first n examples, from `scored`."""
    labels, pred, pred_norm = (t[:n] for t in scored)
    return {"n": n, "correct": (pred == labels).sum().item(),
            "correct_norm": (pred_norm == labels).sum().item()}


# -- Rendering --------------------------------------------------------------------------------

def test_render_example_gives_the_literal_tokens_and_mask_of_the_roof_example(val_1000):
    example = val_1000[519]  # line 1 of hellaswag_val.jsonl, the one build-nanogpt quotes
    assert example["ctx"] == "A man is sitting on a roof. he"
    tokens, mask, label = hellaswag.render_example(example)
    ctx = [32, 582, 318, 5586, 319, 257, 9753, 13, 339]  # "A man is sitting on a roof. he"
    endings = [[318, 1262, 14441, 284, 14441, 257, 5166, 286, 1341, 271, 13],  # " is using wrap.."
               [318, 34759, 1241, 19867, 572, 13],  # " is ripping level tiles off."
               [318, 4769, 257, 6437, 1134, 338, 23441, 13],  # " is holding a rubik's cube."
               [4940, 10427, 510, 9753, 278, 319, 257, 9753, 13]]  # " starts pulling up roofing.."
    assert tokens.tolist() == [ctx + end + [0] * (11 - len(end)) for end in endings]
    assert mask.tolist() == [[0] * 9 + [1] * len(end) + [0] * (11 - len(end)) for end in endings]
    assert tokens.dtype == mask.dtype == torch.long and label == 3


def test_render_example_crops_the_context_from_the_left_to_fit_max_len(val_1000):
    tokens, mask, _ = hellaswag.render_example(val_1000[519])  # (4, 20)
    cropped, cropped_mask, _ = hellaswag.render_example(val_1000[519], max_len=15)  # (4, 15)
    assert torch.equal(cropped, tokens[:, 5:]) and torch.equal(cropped_mask, mask[:, 5:])


def test_a_model_too_short_for_an_ending_and_one_context_token_is_a_clear_error(val_1000):
    tokens, mask, _ = hellaswag.render_example(val_1000[519], max_len=12)  # 11 + 1 fit
    assert mask[:, 0].sum() == 0 and mask.sum(dim=1).max() == 11  # one context token is left
    with pytest.raises(hellaswag.UserError, match="ending of 11 tokens .* block_size of 11"):
        hellaswag.render_example(val_1000[519], max_len=11)


def test_rows_longer_than_the_models_block_size_are_scored_cropped_to_fit(val_1000):
    torch.manual_seed(0)
    short = gpt2.GPT(gpt2.GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8)).eval()
    labels, pred, pred_norm = hellaswag.predict(short, val_1000[519:520], "cpu")  # 20 tokens
    # Scored by hand: the 4 rows without their first 4 tokens, each ending's loss summed and
    # averaged over the positions that predict it.
    tokens, mask, _ = hellaswag.render_example(val_1000[519])  # (4, 20)
    tokens, mask = tokens[:, 4:], mask[:, 4:]  # (4, 16)
    with torch.no_grad():
        logits = short(tokens)[0][:, :-1, :gpt2.VOCAB_SIZE]  # (4, 15, V): t predicts t + 1
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    ending = mask[:, 1:].float()  # (4, 15)
    summed, mean = (nll * ending).sum(1), (nll * ending).sum(1) / ending.sum(1)  # (4,), (4,)
    assert labels.tolist() == [3]
    assert pred.item() == summed.argmin().item() and pred_norm.item() == mean.argmin().item()
    assert len(set(summed.tolist())) == 4  # four real scores, not a tie that any answer wins


# -- Scoring ----------------------------------------------------------------------------------

def transformers_losses(hf: GPT2LMHeadModel, examples: list[dict]) -> torch.Tensor:
    """Each ending's summed and mean loss under transformers: (N, 4, 2).

    Written without hellaswag.py: its own tokenization, padding with <|endoftext|> and an
    attention mask as transformers expects, and logits from hf.lm_head at the positions that
    predict an ending (all of a row's logits would cost 3x the time, for the same numbers).
    """
    enc = tiktoken.get_encoding("gpt2")
    rows, spans = [], []  # the 4N token rows, where each row's ending starts and stops
    for example in examples:
        ctx = enc.encode(example["ctx"])
        for ending in example["endings"]:
            end = enc.encode(" " + ending)
            rows.append(ctx + end)
            spans.append((len(ctx), len(ctx) + len(end)))
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [50256] * (width - len(row)) for row in rows])  # (4N, W)
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    hidden = hf.transformer(ids, attention_mask=attention).last_hidden_state  # (4N, W, C)
    losses = []
    for r, (start, stop) in enumerate(spans):
        logits = hf.lm_head(hidden[r, start - 1:stop - 1])  # (len(end), V): t predicts t + 1
        nll = -logits.log_softmax(dim=-1)[torch.arange(stop - start), rows[r][start:stop]]
        losses.append([nll.sum().item(), nll.mean().item()])
    return torch.tensor(losses).view(-1, 4, 2)


def test_predicted_endings_match_transformers_on_250_real_rows(hf_model, val_1000, scored):
    rows = val_1000[:ORACLE_ROWS]
    with torch.no_grad():
        losses = torch.cat([transformers_losses(hf_model, rows[i:i + 25])
                            for i in range(0, len(rows), 25)])  # (250, 4, 2)
    labels, pred, pred_norm = scored
    assert labels.tolist() == [ex["label"] for ex in rows]
    for ours, loss in ((pred, losses[..., 0]), (pred_norm, losses[..., 1])):  # (250,), (250, 4)
        # The two implementations round differently (about 1e-6), so where two endings tie to
        # that precision either answer is right. Our choice must be transformers' best up to
        # rounding everywhere, and exactly its best but for such rare near-ties.
        picked = loss[torch.arange(len(loss)), ours]  # transformers' loss of our choice
        assert (picked - loss.min(dim=1).values < 1e-4).all()
        assert (ours != loss.argmin(dim=1)).sum() <= 2


def test_a_random_model_scores_near_chance_without_favouring_a_position(scored):
    labels, pred, pred_norm = scored
    for p in (pred, pred_norm):
        assert abs((p == labels).float().mean().item() - 0.25) < 0.08  # 3 sigma at 250 rows
        # A scorer whose losses came out equal (a mask that missed the ending) would always
        # answer 0; one that counted padding would favour the shortest or longest row. Labels
        # sit at each position 24-27% of the time in these 250 rows, so answers should too.
        share = torch.bincount(p, minlength=4) / len(p)  # (4,)
        assert share.min() > 0.15 and share.max() < 0.35, share


def test_predictions_do_not_depend_on_the_batch_size(model, val_1000, scored):
    for batch_size in (1, 7):
        predicted = hellaswag.predict(model, val_1000[:24], "cpu", batch_size=batch_size)
        assert all(torch.equal(a, b[:24]) for a, b in zip(predicted, scored))


class PaddedVocab(torch.nn.Module):
    """`model` with 47 extra vocabulary columns (50304 in all) that beat every real token."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx):
        logits, _ = self.model(idx)  # (B, T, 50257)
        return torch.cat([logits, torch.full((*logits.shape[:2], 47), 1e4)], dim=-1)


def test_padded_vocabulary_columns_are_never_scored(model, val_1000, scored):
    padded = hellaswag.predict(PaddedVocab(model), val_1000[:24], "cpu")  # logits, no tuple
    assert all(torch.equal(a, b[:24]) for a, b in zip(padded, scored))


class LogitsOnly(torch.nn.Module):
    """`model` seen only as tokens -> logits (no `hidden`): scoring's plain, full-logits path."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx)


def test_the_fast_path_gives_the_full_logits_losses_on_real_rows(model, val_1000):
    rendered = [hellaswag.render_example(ex)[:2] for ex in val_1000[:64]]  # (tokens, mask)
    fast = hellaswag.ending_losses(model, rendered, "cpu", batch_size=16)  # (64, 4), packed
    plain = hellaswag.ending_losses(LogitsOnly(model), rendered, "cpu", batch_size=16)  # 4 rows
    # Summed losses of 3-40 tokens, ~1e-6 apart: float rounding, in a different order.
    assert torch.allclose(fast, plain, rtol=1e-5, atol=0), (fast - plain).abs().max()


def test_the_body_runs_over_each_context_once_and_each_ending_once(model, val_1000):
    lengths = []  # the tokens of each forward pass through the body
    hook = model.transformer.wte.register_forward_hook(
        lambda m, args, out: lengths.append(args[0].numel()))
    try:
        hellaswag.predict(model, val_1000[:5], "cpu", batch_size=1)  # one example a pass
    finally:
        hook.remove()
    enc = tiktoken.get_encoding("gpt2")
    assert lengths == sorted(len(enc.encode(ex["ctx"])) + sum(
        len(enc.encode(" " + ending)) for ending in ex["endings"]) for ex in val_1000[:5])


def test_the_lm_head_runs_only_at_the_positions_that_predict_an_ending_token(model, val_1000):
    rows = []  # how many positions each lm_head call got
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(len(args[0])))
    try:
        hellaswag.predict(model, val_1000[:16], "cpu", batch_size=8)
    finally:
        hook.remove()
    ending_tokens = sum(hellaswag.render_example(ex)[1].sum().item() for ex in val_1000[:16])
    assert len(rows) == 2 and sum(rows) == ending_tokens


def test_fp32_scoring_enters_no_autocast_context(model, val_1000, scored, monkeypatch):
    def refuse(*args, **kwargs):  # as torch < 2.5 does on mps, even for enabled=False
        raise RuntimeError("autocast was entered")
    monkeypatch.setattr(torch, "autocast", refuse)
    predicted = hellaswag.predict(model, val_1000[:8], "cpu")
    assert all(torch.equal(a, b[:8]) for a, b in zip(predicted, scored))


class Dtypes(TorchFunctionMode):
    """Records the dtype of every tensor that a torch function returns while it is active."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.add(t.dtype)
        return out


def test_scoring_makes_no_float64_tensor_which_apples_mps_lacks(model, val_1000):
    for fast_or_plain in (model, LogitsOnly(model)):
        with Dtypes() as dtypes:
            hellaswag.evaluate(fast_or_plain, val_1000[:8], "cpu", batch_size=4)
        assert torch.float32 in dtypes.seen and torch.float64 not in dtypes.seen, dtypes.seen


def test_examples_per_second_is_the_examples_over_the_seconds_predict_took(
        model, val_1000, monkeypatch):
    calls = []
    monkeypatch.setattr(hellaswag, "predict", lambda *args, **kwargs: calls.append(kwargs))
    clock = iter([10.0, 12.5])  # predict starts at 10 s and ends at 12.5 s
    monkeypatch.setattr(hellaswag.time, "perf_counter", lambda: next(clock))
    rate = hellaswag.examples_per_second(model, val_1000[:5], "cpu", batch_size=2)
    assert rate == 5 / 2.5 and calls == [{"batch_size": 2}]


class Spy(torch.nn.Module):
    """Records whether autograd and training mode were on during each forward pass."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, idx):
        self.seen.append((torch.is_grad_enabled(), self.training))
        return self.model(idx)


def test_evaluate_runs_without_grad_in_eval_mode_and_restores_training_mode(model, val_1000):
    spy = Spy(model).train()
    result = hellaswag.evaluate(spy, val_1000[:5], "cpu", batch_size=2)
    assert spy.seen == [(False, False)] * 3  # 5 examples, 2 per forward
    assert spy.training and model.training  # as before the call
    assert result["n"] == 5 and result["acc"] == result["correct"] / 5


def test_bf16_autocast_gives_nearly_the_same_accuracy(model, val_1000, scored):
    bf16 = hellaswag.evaluate(model, val_1000[:40], "cpu", autocast_dtype=torch.bfloat16)
    assert bf16["n"] == 40
    assert abs(bf16["correct_norm"] - counts(scored, 40)["correct_norm"]) <= 4


class ConstantLogits(torch.nn.Module):
    """Tokens -> the same logits row at every position (scoring's plain path)."""

    def __init__(self, row: torch.Tensor):
        super().__init__()
        self.row = row  # (50257,)

    def forward(self, idx):
        return self.row.expand(*idx.shape, -1)


NOT_FINITE_LOGITS = {
    "NaN": torch.full((hellaswag.N_VOCAB,), float("nan")),
    # Every token but "!" (id 0, in no ending scored here) is impossible: each loss is +inf.
    "inf": torch.cat([torch.zeros(1), torch.full((hellaswag.N_VOCAB - 1,), float("-inf"))]),
}


@pytest.mark.parametrize("logits", NOT_FINITE_LOGITS)
def test_losses_that_are_not_finite_are_an_error_not_an_accuracy(logits, val_1000):
    model = ConstantLogits(NOT_FINITE_LOGITS[logits])
    with pytest.raises(hellaswag.UserError, match="losses are not finite") as error:
        hellaswag.evaluate(model, val_1000[:6], "cpu")
    assert "diverged" in str(error.value) and "\n" not in str(error.value)


def test_cli_on_a_diverged_checkpoint_is_one_error_line_not_an_accuracy(val_file, tmp_path, run_main):
    diverged = gpt2.GPT(gpt2.GPTConfig(block_size=64, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        diverged.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))  # as a diverged run leaves it
    path = checkpoints.Checkpoints(tmp_path).path(0)
    torch.save(dict(model=diverged.state_dict(), config=asdict(diverged.config)), path)
    result = run_main(cli.main, "hellaswag", "--checkpoint", path, "--file", val_file, "--limit", "4",
                 "--device", "cpu")
    # The checkpoint's weights are checked as it is read, before any scoring.
    assert_one_error_line(result, "NaN or infinite weights", str(path))
    assert result[1] == ""  # no acc line


# -- Two ranks --------------------------------------------------------------------------------

def test_two_ranks_shares_sum_to_the_single_process_counts(model, val_1000, scored):
    examples = val_1000[:41]  # odd: rank 0 scores 21 examples, rank 1 scores 20
    shares = [hellaswag.evaluate(model, examples, "cpu", rank=r, world_size=2) for r in (0, 1)]
    assert [s["n"] for s in shares] == [21, 20]
    for key, total in counts(scored, 41).items():
        assert shares[0][key] + shares[1][key] == total


def torchrun_two(script: Path, *args) -> subprocess.CompletedProcess:
    """`script ARGS` in 2 processes under torchrun, rendezvous on 127.0.0.1, one thread each."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", script, *args],
        capture_output=True, text=True, timeout=300, cwd=HERE,
        env={**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"})


SHARES_WORKER = """
import json, sys
from datetime import timedelta
from pathlib import Path
import torch, torch.distributed as dist
import gpt2, hellaswag
data_file, out, model_file, nan_model_file, model_folder = sys.argv[1:]
# A rank left waiting in a collective fails within a minute, not gloo's default 30.
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world_size = dist.get_rank(), dist.get_world_size()
model = torch.load(model_file, weights_only=False)
results = {}
for limit in (1, 3):  # shares of 1 and 0 examples, then 2 and 1
    examples = hellaswag.load_examples(file=data_file, limit=limit)
    results[limit] = hellaswag.evaluate(model, examples, "cpu", rank=rank, world_size=world_size)
# Our GPT, as `hellaswag.py --model FOLDER` loads it, on 41 rows: shares of 21 and 20
gpt = gpt2.load_pretrained(model_folder)
rows = hellaswag.load_examples(file=data_file, limit=41)
results[41] = hellaswag.evaluate(gpt, rows, "cpu", rank=rank, world_size=world_size)
Path(out, f"shares{rank}.json").write_text(json.dumps(results))
# Rank 1's losses are NaN, rank 0's are fine: both must stop, neither wait for the other.
if rank == 1:
    model = torch.load(nan_model_file, weights_only=False)
try:
    hellaswag.evaluate(model, examples, "cpu", rank=rank, world_size=world_size)
except hellaswag.UserError as e:
    Path(out, f"error{rank}.json").write_text(json.dumps(str(e)))
dist.destroy_process_group()
"""


def tiny_model() -> torch.nn.Module:
    """Tokens -> logits in one embedding and one linear layer: the plain road, in no time."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(hellaswag.N_VOCAB, 8),
                               torch.nn.Linear(8, hellaswag.N_VOCAB)).eval()


@pytest.fixture(scope="module")
def two_ranks(val_file, model_folder, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """SHARES_WORKER under torchrun with 2 gloo processes: the run, and the folder where each
    rank wrote its results (shares0.json, ...) and its error (error0.json, ...)."""
    folder = tmp_path_factory.mktemp("two_ranks")
    model = tiny_model()
    torch.save(model, folder / "model.pt")
    with torch.no_grad():
        model[1].bias.fill_(float("nan"))
    torch.save(model, folder / "nan_model.pt")
    (folder / "worker.py").write_text(SHARES_WORKER)
    run = torchrun_two(folder / "worker.py", val_file, folder, folder / "model.pt",
                       folder / "nan_model.pt", model_folder)
    return run, folder


def per_rank(folder: Path, name: str) -> list:
    """What each of the two ranks wrote to `name`0.json and `name`1.json (None: nothing)."""
    paths = [folder / f"{name}{rank}.json" for rank in (0, 1)]
    return [json.loads(path.read_text()) if path.exists() else None for path in paths]


def test_two_ranks_with_an_empty_or_uneven_share_count_what_one_process_counts(two_ranks, val_1000):
    run, folder = two_ranks
    ranks = per_rank(folder, "shares")
    assert None not in ranks, run.stderr
    model = tiny_model()
    for limit in (1, 3):
        alone = hellaswag.evaluate(model, val_1000[:limit], "cpu")
        assert alone["n"] == limit
        assert ranks[0][str(limit)] == ranks[1][str(limit)] == alone


def test_two_gloo_processes_under_torchrun_count_what_one_process_counts(two_ranks, scored):
    run, folder = two_ranks
    ranks = per_rank(folder, "shares")
    assert None not in ranks, run.stderr
    for result in ranks:  # after the all_reduce, each rank holds the sum of both shares
        assert {k: result["41"][k] for k in ("n", "correct", "correct_norm")} == counts(scored, 41)


def test_an_error_on_one_rank_stops_every_rank_instead_of_leaving_one_waiting(two_ranks):
    run, folder = two_ranks
    errors = per_rank(folder, "error")
    assert run.returncode == 0 and None not in errors, run.stderr
    assert "losses are not finite" in errors[1]  # its own error
    assert "failed on rank(s) 1 " in errors[0]  # the other's: who failed, and where to look


# -- Download ---------------------------------------------------------------------------------

def pin_val(monkeypatch, data: bytes, *, whole: bool):
    """Make `data` (our 1,000 rows) what the val split must be: its rows, and with `whole` its
    size and sha256 too, as the real file's are pinned."""
    size, digest = (len(data), hashlib.sha256(data).hexdigest()) if whole else (None, None)
    monkeypatch.setitem(hellaswag.SPLIT_FILES, "val",
                        hellaswag.Pinned(rows=1000, size=size, sha256=digest))


@pytest.fixture
def github(tmp_path, monkeypatch, local_hub, val_file):
    """A server on 127.0.0.1 (conftest's LocalHub) standing in for raw.githubusercontent.com,
    holding hellaswag_val.jsonl (our 1,000 rows, pinned as the val split); HELLASWAG_URL points
    at it; a fresh cache."""
    github = local_hub({"hellaswag_val.jsonl": val_file.read_bytes()})
    pin_val(monkeypatch, val_file.read_bytes(), whole=True)
    monkeypatch.setenv("HELLASWAG_URL", github.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return github


def test_download_writes_the_cache_once_and_reads_it_after(github, tmp_path, val_file):
    examples = hellaswag.load_examples("val", limit=10)
    cached = tmp_path / "cache/gpt2/hellaswag/hellaswag_val.jsonl"
    assert cached.read_bytes() == val_file.read_bytes()
    assert list(cached.parent.iterdir()) == [cached]  # no temporary file left behind
    assert hellaswag.load_examples("val")[:10] == examples  # from the cache:
    assert github.paths == ["/hellaswag_val.jsonl"]  # one request in all


def test_a_failed_download_names_the_url_and_leaves_no_file(github, tmp_path):
    with pytest.raises(hellaswag.UserError, match=r"hellaswag_train.jsonl: HTTP 404"):
        hellaswag.load_examples("train")
    assert list((tmp_path / "cache/gpt2/hellaswag").iterdir()) == []


def first_rows(data: bytes, n: int) -> bytes:
    return b"".join(data.splitlines(keepends=True)[:n])


PINS = {"size, sha256 and rows pinned": True, "rows pinned only": False}
# How a server's answer may differ from the file and still look complete: a body cut short
# that no Content-Length gives away (here a 200 whose body is the file's first 200 rows), or one
# byte changed.
BAD_BODIES = {
    "cut short": lambda hub: hub.routes.update({"/hellaswag_val.jsonl": lambda hub, path: (
        200, {}, first_rows(hub.files["hellaswag_val.jsonl"], 200))}),
    "one byte changed": lambda hub: hub.faults["hellaswag_val.jsonl"].append("corrupt"),
}


@pytest.mark.parametrize("pins", PINS)
@pytest.mark.parametrize("body", BAD_BODIES)
def test_a_download_that_is_not_the_whole_file_is_neither_cached_nor_scored(
        body, pins, github, tmp_path, monkeypatch, val_1000):
    pin_val(monkeypatch, github.files["hellaswag_val.jsonl"], whole=PINS[pins])
    BAD_BODIES[body](github)
    with pytest.raises(hellaswag.UserError, match="hellaswag_val.jsonl"):
        hellaswag.load_examples("val")
    assert list((tmp_path / "cache/gpt2/hellaswag").iterdir()) == []  # nothing kept, no .part
    github.routes.clear()  # the server is right again: the next run gets the whole file
    assert hellaswag.load_examples("val") == val_1000


DAMAGES = {
    "200 of its 1,000 rows": lambda data: first_rows(data, 200),
    "cut in the middle of a line": lambda data: data[:data.index(b"\n", len(data) // 2) - 10],
}


@pytest.mark.parametrize("pins", PINS)
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cached_file_is_deleted_and_the_next_run_downloads_it_again(
        damage, pins, github, tmp_path, monkeypatch, val_file, val_1000):
    pin_val(monkeypatch, val_file.read_bytes(), whole=PINS[pins])
    cached = tmp_path / "cache/gpt2/hellaswag/hellaswag_val.jsonl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(DAMAGES[damage](val_file.read_bytes()))  # a run of an older version
    with pytest.raises(hellaswag.UserError, match=re.escape(f"{cached}: ") + ".* run again"):
        hellaswag.load_examples("val", limit=10)  # a limit does not hide the damage
    assert not cached.exists() and github.paths == []
    assert hellaswag.load_examples("val", limit=10) == val_1000[:10]
    assert github.paths == ["/hellaswag_val.jsonl"] and cached.read_bytes() == val_file.read_bytes()


# -- Command line -----------------------------------------------------------------------------

def report_lines(scored, n: int) -> list[str]:
    """The acc and acc_norm lines the command line prints for the first n examples."""
    c = counts(scored, n)
    return [f"acc      {c['correct'] / n:.4f}  ({c['correct']}/{n})",
            f"acc_norm {c['correct_norm'] / n:.4f}  ({c['correct_norm']}/{n})"]


def test_cli_downloads_from_base_url_and_prints_acc_acc_norm_n_and_speed(
        github, model_folder, scored, run_main, monkeypatch):
    # In this process, where our 1,000 rows are pinned as the val split (a subprocess would
    # expect the real file's 10,042).
    monkeypatch.setenv("HELLASWAG_URL", "http://127.0.0.1:9/nothing")  # --base_url wins over it
    code, out, err = run_main(cli.main, "hellaswag", "--model", model_folder, "--limit", "12",
                         "--device", "cpu", "--base_url", github.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:3] == [*report_lines(scored, 12), "n        12"]
    assert lines[3].startswith("elapsed") and "examples/s on cpu" in lines[3]


def test_help_gives_every_flags_default_or_says_what_happens_without_it(capsys):
    with pytest.raises(SystemExit):
        cli.hellaswag_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    defaults = vars(cli.hellaswag_parser().parse_args([]))
    said = {"limit": "none = all 10,042 of val", "base_url": "none = $HELLASWAG_URL",
            "file": "instead of downloading", "checkpoint": "[--model MODEL | --checkpoint"}
    assert set(defaults) == {"model", "checkpoint", "split", "file", "limit", "batch_size",
                             "base_url", "device"}
    for flag, value in defaults.items():
        assert (f"(default: {value})" if value is not None else said[flag]) in text, flag
    assert text.count("(default:") == 4  # one each, no "(default: None)"


ROOF = {"ctx": "A man is sitting on a roof. he", "label": 3,
        "endings": ["is using wrap.", "is ripping tiles.", "is holding a cube.", "starts."]}
BAD_FILES = {
    "malformed JSON": ([ROOF, "{\"ctx\": 1", ROOF], "line 2: not valid JSON"),
    "3 endings": ([ROOF, {**ROOF, "endings": ROOF["endings"][:3]}],
                  "line 2: 3 endings, HellaSwag has 4"),
    "label 7": ([ROOF, ROOF, {**ROOF, "label": 7}],
                "line 3: 'label' must be an integer 0-3, got 7"),
    "no label": ([{k: v for k, v in ROOF.items() if k != "label"}], "line 1: no 'label'"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_is_one_line_naming_the_line_and_exit_1(case, tmp_path, run_main):
    rows, message = BAD_FILES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    # The data is read before the model is loaded: this folder is never looked at.
    code, out, err = run_main(cli.main, "hellaswag", "--file", path, "--model", tmp_path / "no_model")
    assert code == 1
    assert out == "" and err.startswith(f"error: {path}: {message}") and err.count("\n") == 1
    assert path.exists()  # the user's own file, never deleted


def test_a_binary_file_is_one_line_and_exit_1_not_a_traceback(tmp_path, run_main):
    path = tmp_path / "weights.jsonl"
    path.write_bytes(json.dumps(ROOF).encode() + b"\n\xff\xfe\x00\x81 not text\n")
    code, out, err = run_main(cli.main, "hellaswag", "--file", path, "--model", tmp_path / "no_model")
    assert (code, out) == (1, "")
    assert err == f"error: {path}: not UTF-8 text (invalid start byte): not a HellaSwag jsonl file\n"


def test_a_missing_file_is_one_line_and_exit_1(tmp_path):
    code, _, err = run_script("hellaswag.py", "--file", tmp_path / "nope.jsonl")
    assert (code, err) == (1, f"error: {tmp_path / 'nope.jsonl'}: no such file\n")


def test_cli_scores_a_training_checkpoint(model, val_file, scored, tmp_path, capsys):
    path = checkpoints.Checkpoints(tmp_path).path(0)
    torch.save(dict(model=model.state_dict(), config=asdict(model.config)), path)
    cli.main(["hellaswag", "--checkpoint", str(path), "--file", str(val_file), "--limit", "12",
               "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[:2] == report_lines(scored, 12)
