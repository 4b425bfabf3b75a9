"""The data's reliability: fineweb.py's folder held by one run and checked against its manifest
before training, inputs that change under a job, hostile servers (bodies without end, a byte a
second, redirect loops, no DNS), and the rule for "<|endoftext|>" in the user's text.

Small and in this process (conftest's `run_main`, `local_hub`): a few thousand tokens of Tiny
Shakespeare, shards of a few hundred tokens, a server on 127.0.0.1 whose stall thresholds the
tests lower so that a slow line is judged in a second, not a minute.
"""
import hashlib
import json
import os
import random
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import cli
import fineweb
import gpt2
import hellaswag
import plumbing
import shards
import tools
from conftest import TINY_RUN, assert_one_error_line

FLAGS = ["--num_proc", "1", "--docs_per_batch", "4"]


@pytest.fixture(scope="module")
def enc():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture
def jsonl(tmp_path, samples):
    """A .jsonl of 60 documents of Tiny Shakespeare, a few dozen tokens each."""
    lines = (samples / "tinyshakespeare.txt").read_text().split("\n\n")[:60]
    path = tmp_path / "plays.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in lines))
    return path


@pytest.fixture
def convert(run_main):
    """convert(out_dir, inputs, *flags): fineweb.py on local files, in this process."""
    return lambda out_dir, inputs, *flags: run_main(fineweb.main, "--input", *inputs, "--out_dir", out_dir,
                                               *FLAGS, *flags)


def manifest_of(out_dir):
    return json.loads((out_dir / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------
# The output folder: one run at a time, and checked against the manifest before training.
# ---------------------------------------------------------------------------------------
def test_a_second_fineweb_run_on_an_out_dir_being_written_is_refused_with_one_line(
        tmp_path, jsonl, convert, monkeypatch, capsys):
    out_dir, seconds = tmp_path / "shards", []
    real_write = fineweb.ShardWriter.write

    def write_while_another_run_starts(self, next_start):
        if not seconds:  # the first run is between two shards: a second one starts on its folder
            seconds.append("started")
            seconds.append(fineweb.main(["--input", str(jsonl), "--out_dir", str(out_dir), *FLAGS,
                                         "--shard_size", "300"]))
        real_write(self, next_start)

    monkeypatch.setattr(fineweb.ShardWriter, "write", write_while_another_run_starts)
    code, _, err = convert(out_dir, [jsonl], "--shard_size", "300")
    assert code == 0 and seconds == ["started", 1], err
    assert "another fineweb.py is writing" in err and str(out_dir) in err
    listed = [s["name"] for s in manifest_of(out_dir)["shards"]]
    assert sorted(p.name for p in out_dir.glob("*.bin")) == sorted(listed)  # no shard the manifest lacks


def test_a_failed_first_run_leaves_no_out_dir_behind_despite_its_lock(tmp_path, convert):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert_one_error_line(convert(tmp_path / "shards", [bad]), "bad.jsonl line 1")
    assert not (tmp_path / "shards").exists()


@pytest.fixture
def finished(tmp_path, jsonl, convert):
    out_dir = tmp_path / "shards"
    assert convert(out_dir, [jsonl], "--shard_size", "300")[0] == 0
    assert len(manifest_of(out_dir)["shards"]) >= 4
    return out_dir


def test_check_finished_refuses_a_deleted_train_shard_naming_it(finished):
    (finished / "fineweb_edu_train_000002.bin").unlink()
    with pytest.raises(plumbing.UserError, match="fineweb_edu_train_000002.bin is missing"):
        fineweb.check_finished(finished)


def test_check_finished_refuses_a_stray_shard_the_manifest_does_not_list(finished):
    fineweb.write_shard(finished / "fineweb_edu_train_000099.bin", [50256, 1, 2])
    with pytest.raises(plumbing.UserError, match="fineweb_edu_train_000099.bin.*not one fineweb.py listed"):
        fineweb.check_finished(finished)


def test_check_finished_refuses_a_shard_with_other_token_counts_than_the_manifest(finished):
    fineweb.write_shard(finished / "fineweb_edu_train_000001.bin", [50256, 1, 2])
    with pytest.raises(plumbing.UserError, match="fineweb_edu_train_000001.bin holds 3 tokens, the manifest lists"):
        fineweb.check_finished(finished)


def test_gpt2_refuses_to_train_on_a_folder_with_a_missing_shard(finished, tmp_path, run_main):
    (finished / "fineweb_edu_train_000001.bin").unlink()
    assert_one_error_line(run_main(cli.main, "--data_dir", finished, "--log_dir", tmp_path / "log", *TINY_RUN,
                              "--seq_len", "16", "--batch_size", "1", "--total_batch_size", "16",
                              "--max_steps", "1", "--device", "cpu"),
                          "fineweb_edu_train_000001.bin is missing")


def test_fineweb_records_each_shards_sha256_and_the_fingerprint_is_over_them(finished):
    manifest = manifest_of(finished)
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((finished / shard["name"]).read_bytes()).hexdigest()
    train = sorted(finished.glob("*train*.bin"))
    before = shards.data_fingerprint(train)
    # another fineweb.py output under the same names and sizes, differing only in the middle of
    # one shard (what a cheap head-and-tail digest cannot see): its manifest says so
    manifest["shards"][2]["sha256"] = "0" * 64
    (finished / "manifest.json").write_text(json.dumps(manifest))
    assert shards.data_fingerprint(train) != before


def test_the_fingerprint_of_shards_without_recorded_digests_still_sees_their_bytes(finished):
    manifest = manifest_of(finished)
    for shard in manifest["shards"]:
        del shard["sha256"]  # a manifest of an older fineweb.py
    (finished / "manifest.json").write_text(json.dumps(manifest))
    train = sorted(finished.glob("*train*.bin"))
    before = shards.data_fingerprint(train)
    tokens = gpt2.read_shard(train[0]).copy()
    tokens[-1] ^= 1
    fineweb.write_shard(train[0], tokens)
    assert shards.data_fingerprint(train) != before


# ---------------------------------------------------------------------------------------
# An input that changes between a stopped run and its rerun.
# ---------------------------------------------------------------------------------------
def test_a_rerun_after_the_input_changed_is_refused_naming_the_file(tmp_path, jsonl, convert, disk_full_at,
                                                                   monkeypatch):
    out_dir = tmp_path / "shards"
    real_write_shard = disk_full_at("_000003.bin")
    assert convert(out_dir, [jsonl], "--shard_size", "300")[0] == 1
    monkeypatch.setattr(fineweb, "write_shard", real_write_shard)
    lines = jsonl.read_text().splitlines(keepends=True)
    random.Random(0).shuffle(lines)
    jsonl.write_text("".join(lines))
    assert_one_error_line(convert(out_dir, [jsonl], "--shard_size", "300"), str(jsonl), "changed since")


# ---------------------------------------------------------------------------------------
# Hostile servers.
# ---------------------------------------------------------------------------------------
DATA = bytes(range(256)) * 8  # 2,048 bytes


def test_an_endless_body_stops_at_the_expected_size_and_leaves_no_part(tmp_path, local_hub, no_backoff):
    hub = local_hub({"f.bin": DATA})
    hub.faults["f.bin"] = ["endless"]
    dest = tmp_path / "cache" / "f.bin"
    with pytest.raises(plumbing.UserError, match="more than the 2,048 bytes expected"):
        plumbing.download(f"{hub.url}/f.bin", dest, size=len(DATA))
    assert os.listdir(dest.parent) == []


def test_an_endless_body_of_unknown_size_stops_at_the_cap_and_leaves_no_part(tmp_path, local_hub, no_backoff):
    hub = local_hub({"config.json": DATA})
    hub.faults["config.json"] = ["endless"]
    dest = tmp_path / "cache" / "config.json"
    started = time.monotonic()
    with pytest.raises(plumbing.UserError, match="more than 1,048,576 bytes"):
        plumbing.download(f"{hub.url}/config.json", dest)  # no size: as gpt2.py asks for a config
    assert os.listdir(dest.parent) == []
    assert time.monotonic() - started < 5


def test_a_server_sending_a_byte_at_a_time_is_given_up_and_retried(tmp_path, local_hub, no_backoff, monkeypatch,
                                                                  capsys):
    monkeypatch.setattr(plumbing, "STALL_SECONDS", 1)
    hub = local_hub({"f.bin": DATA})
    hub.faults["f.bin"] = ["trickle"]
    dest = tmp_path / "f.bin"
    started = time.monotonic()
    plumbing.download(f"{hub.url}/f.bin", dest, size=len(DATA))
    assert time.monotonic() - started < 5  # the trickle alone would take 200 s
    assert dest.read_bytes() == DATA and len(hub.downloads("f.bin")) == 2
    assert "under 65,536 bytes in 1 s; retrying" in capsys.readouterr().err  # the retry's line says why


def test_a_server_that_always_trickles_is_given_up_after_the_tries(tmp_path, local_hub, no_backoff, monkeypatch):
    monkeypatch.setattr(plumbing, "STALL_SECONDS", 0.3)
    hub = local_hub({"f.bin": DATA})
    hub.faults["f.bin"] = ["trickle"] * plumbing.MAX_TRIES
    with pytest.raises(plumbing.UserError, match="gave up after"):
        plumbing.download(f"{hub.url}/f.bin", tmp_path / "f.bin", size=len(DATA))
    assert len(no_backoff) == plumbing.MAX_TRIES - 1  # a few bytes a try is no progress


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return lambda url: monkeypatch.setenv("HF_ENDPOINT", url)


def test_a_redirect_loop_is_one_line_naming_the_url(local_hub, offline_hub, run_main):
    hub = local_hub({})
    offline_hub(f"{hub.url}/loop")
    line = assert_one_error_line(run_main(cli.main, "sample", "--model", "gpt2", "--device", "cpu"), "redirects")
    assert f"{hub.url}/loop/openai-community/gpt2/resolve/main/config.json" in line


def test_a_name_that_does_not_resolve_is_one_line_at_once(offline_hub, run_main, no_backoff, monkeypatch):
    real = socket.getaddrinfo

    def no_dns(host, *args, **kwargs):
        if host == "hub.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    offline_hub("http://hub.invalid")
    assert_one_error_line(run_main(cli.main, "sample", "--model", "gpt2", "--device", "cpu"),
                          "cannot reach hub.invalid: offline?", "HF_ENDPOINT", "--model")
    assert no_backoff == []


def test_a_refused_connection_is_retried_each_on_one_short_line(offline_hub, run_main, no_backoff):
    offline_hub("http://127.0.0.1:9")  # nothing listens there
    code, out, err = run_main(cli.main, "sample", "--model", "gpt2", "--device", "cpu")
    assert_one_error_line((code, out, err), "127.0.0.1:9", "Connection refused", "gave up", alone=False)
    lines = err.strip().splitlines()
    assert len(lines) == plumbing.MAX_TRIES and len(no_backoff) == plumbing.MAX_TRIES - 1
    assert all(len(line) < 200 and "object at 0x" not in line and "Pool" not in line for line in lines), lines


# ---------------------------------------------------------------------------------------
# "<|endoftext|>" in the user's text is plain text, everywhere.
# ---------------------------------------------------------------------------------------
TEXT = "one<|endoftext|>two"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tools.save_pretrained(gpt2.GPT(gpt2.GPTConfig(block_size=32, vocab_size=gpt2.VOCAB_SIZE, n_layer=1, n_head=1,
                                                 n_embd=8)), folder)
    return folder


def test_endoftext_in_a_prompt_is_plain_text_to_sample(tiny_folder, run_main, enc):
    code, out, err = run_main(cli.main, "sample", "--model", tiny_folder, "--prompt", TEXT, "--num_samples", "1",
                         "--max_new_tokens", "2", "--device", "cpu")
    assert code == 0, err
    assert out.splitlines()[1].startswith(TEXT)
    assert len(gpt2.sample_texts(gpt2.load_pretrained(tiny_folder), TEXT, 1, 2, "cpu", seed=0)[0]) > len(TEXT)


def test_endoftext_in_a_hellaswag_row_is_plain_text(enc):
    tokens, mask, _ = hellaswag.render_example({"ctx": TEXT, "endings": [TEXT] * 4, "label": 0}, enc)
    ctx = enc.encode_ordinary(TEXT)
    assert tokens[0][:len(ctx)].tolist() == ctx and 50256 not in tokens.tolist()


def test_endoftext_in_an_input_file_is_plain_text_to_fineweb(tmp_path, convert, enc):
    (tmp_path / "a.txt").write_text(TEXT * 20)
    assert convert(tmp_path / "shards", [tmp_path / "a.txt"])[0] == 0
    tokens = np.concatenate([gpt2.read_shard(p) for p in sorted((tmp_path / "shards").glob("*.bin"),
                                                                  key=lambda p: p.stem[-6:])])
    assert tokens.tolist() == [fineweb.EOT] + enc.encode_ordinary(TEXT * 20)


def test_endoftext_is_plain_text_to_the_exported_tokenizer(tmp_path, enc):
    transformers = pytest.importorskip("transformers")
    for name, data in tools.tokenizer_files(1024).items():
        (tmp_path / name).write_bytes(data)
    tokenizer = transformers.GPT2Tokenizer.from_pretrained(tmp_path)
    assert tokenizer(TEXT)["input_ids"] == enc.encode_ordinary(TEXT)
    assert tokenizer.eos_token_id == fineweb.EOT


# ---------------------------------------------------------------------------------------
# Parquet columns and folders given as --input.
# ---------------------------------------------------------------------------------------
def test_a_null_text_in_a_parquet_file_is_one_line_naming_its_row(tmp_path, convert):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a document", "another", None, "more"]}), path)
    assert_one_error_line(convert(tmp_path / "shards", [path]), "nulls.parquet row 2", "null")
    assert not (tmp_path / "shards").exists()


def test_a_dictionary_encoded_text_column_gives_the_shards_of_a_plain_one(tmp_path, convert, samples):
    texts = (samples / "tinyshakespeare.txt").read_text().split("\n\n")[:50] * 2
    pq.write_table(pa.table({"text": pa.array(texts)}), tmp_path / "plain.parquet")
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), tmp_path / "dict.parquet")
    assert pa.types.is_dictionary(pq.ParquetFile(tmp_path / "dict.parquet").schema_arrow.field("text").type)
    for name in ("plain", "dict"):
        assert convert(tmp_path / name, [tmp_path / f"{name}.parquet"])[0] == 0
    for shard in (tmp_path / "plain").glob("*.bin"):
        assert (tmp_path / "dict" / shard.name).read_bytes() == shard.read_bytes()


def test_input_naming_a_folder_says_it_is_a_folder(tmp_path, convert):
    (tmp_path / "texts").mkdir()
    assert_one_error_line(convert(tmp_path / "shards", [tmp_path / "texts"]), "texts", "a folder, not a file")
