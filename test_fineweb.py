"""Tests for fineweb.py, offline, as worked examples.

A stand-in for the Hugging Face hub runs on 127.0.0.1 (conftest's `LocalHub`): it answers the
tree API (one file per page, so the pagination is exercised) and serves two real FineWeb-Edu
parquet files under the hub's paths, with HTTP Range support and faults to inject on demand (a
connection dropped halfway, a 503, a 404, a slow line, corrupted bytes). The two files are the
150 documents of samples/fineweb_edu_sample10BT_150.parquet as they are (one row group)
and the same documents rewritten with row groups of 16 rows, so that reading by row groups,
resuming inside a file and crossing from one file to the next are all on the path.

fineweb.py runs as the user runs it, `python fineweb.py ...` in a subprocess with HF_ENDPOINT
pointed at the fake hub, with shards of 20,000 tokens: ~180,000 tokens make 9 shards.

Your own text (`--input` .txt, .jsonl, .parquet) is tested on samples/tinyshakespeare.txt and
the same FineWeb-Edu documents, against tiktoken's encoding; its many ways of being bad run
in this process (conftest's `run_main` calls `fineweb.main`), which is quicker than a subprocess.
"""
import concurrent.futures
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import fineweb
import gpt2
import plumbing
import shards
import tools
from conftest import LocalHub, assert_one_error_line, run_script

FINEWEB = Path(__file__).resolve().parent / "fineweb.py"
SAMPLE = "fineweb_edu_sample10BT_150.parquet"
HUB_DIR = "sample/10BT"  # where --name sample-10BT lives in the dataset repository
SHARD_SIZE = 20_000
FLAGS = ["--shard_size", str(SHARD_SIZE), "--num_proc", "2", "--docs_per_batch", "32"]


# ---------------------------------------------------------------------------------------
# The data: two parquet files of real documents, and the tokens they must become.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def parquet_files(samples, tmp_path_factory):
    """{hub name: bytes} of the two files the fake hub serves."""
    regrouped = tmp_path_factory.mktemp("parquet") / "regrouped.parquet"
    pq.write_table(pq.read_table(samples / SAMPLE), regrouped, row_group_size=16)
    assert pq.ParquetFile(regrouped).num_row_groups == 10
    return {f"{HUB_DIR}/000_00000.parquet": (samples / SAMPLE).read_bytes(),
            f"{HUB_DIR}/001_00000.parquet": regrouped.read_bytes()}


@pytest.fixture
def local_files(parquet_files, tmp_path):
    """The same two files on local disk, for --input."""
    paths = [tmp_path / Path(name).name for name in parquet_files]
    for path, data in zip(paths, parquet_files.values()):
        path.write_bytes(data)
    return paths


@pytest.fixture(scope="session")
def documents(parquet_files):
    """The texts of both files, in order: 300 documents."""
    return [text for data in parquet_files.values() for text in pq.read_table(pa.BufferReader(data))["text"].to_pylist()]


@pytest.fixture(scope="session")
def expected_tokens(documents):
    """The token stream fineweb.py must write: <|endoftext|> then the document, for each."""
    enc = tiktoken.get_encoding("gpt2")
    return np.concatenate([[fineweb.EOT, *enc.encode_ordinary(text)] for text in documents]).astype(np.uint16)


# ---------------------------------------------------------------------------------------
# The fake hub.
# ---------------------------------------------------------------------------------------
RESOLVE = "/datasets/HuggingFaceFW/fineweb-edu/resolve/main/"  # the hub's path to a file
TREE = f"/api/datasets/HuggingFaceFW/fineweb-edu/tree/main/{HUB_DIR}"  # and to the file list


def tree_page(hub, path):
    """The hub's tree API: one file per page, the next page behind a Link header, as the hub
    paginates. A route of conftest's LocalHub."""
    names = sorted(hub.files)
    page = int(path.partition("?cursor=")[2] or 0)
    data = hub.files[names[page]]
    entry = {"type": "file", "oid": "0" * 40, "size": len(data), "path": names[page],
             "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
    headers = {"Link": f'<{hub.url}{TREE}?cursor={page + 1}>; rel="next"'} if page + 1 < len(names) else {}
    return 200, headers, json.dumps([entry]).encode()


HUB = dict(root=RESOLVE, routes={TREE: tree_page})  # LocalHub(files, **HUB): the FineWeb-Edu hub


@pytest.fixture
def hub(parquet_files, local_hub):
    return local_hub(parquet_files, **HUB)


# ---------------------------------------------------------------------------------------
# Running fineweb.py and reading what it wrote.
# ---------------------------------------------------------------------------------------
def fineweb_args(tmp, *flags):
    return ["--out_dir", str(tmp / "shards"), "--cache_dir", str(tmp / "cache"), *FLAGS, *flags]


def hub_env(hub):
    """The environment of a run: HF_ENDPOINT at the fake hub, or (no hub) at a closed port."""
    return {"HF_ENDPOINT": hub.url if hub else "http://127.0.0.1:9"}


def run_fineweb(tmp, hub, *flags):
    """Run `python fineweb.py` as a user would; return (exit code, stdout, stderr)."""
    return run_script("fineweb.py", *fineweb_args(tmp, *flags), env=hub_env(hub), timeout=120)


def input_args(out_dir, inputs, *flags):
    """fineweb.py's arguments to turn local files into shards in out_dir."""
    return ["--input", *map(str, inputs), "--out_dir", str(out_dir), *FLAGS, *flags]


@pytest.fixture
def convert(run_main):
    """convert(out_dir, inputs, *flags) runs fineweb.py on local files in this process (cheaper
    than a subprocess): (exit code, stdout, stderr)."""
    return lambda out_dir, inputs, *flags: run_main(fineweb.main, *input_args(out_dir, inputs, *flags))


def shards_in(out_dir):
    """{name: bytes} of every shard in out_dir, in shard order (val 0, train 1, 2, ...)."""
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).glob("fineweb_edu_*.bin"), key=lambda p: p.stem[-6:])}


@pytest.fixture(scope="session")
def clean_run(parquet_files, tmp_path_factory):
    """An uninterrupted download-and-tokenize run: the reference every other run must match."""
    tmp = tmp_path_factory.mktemp("clean")
    with LocalHub(parquet_files, **HUB) as hub:
        code, out, err = run_fineweb(tmp, hub)
    assert code == 0, err
    return {"dir": tmp / "shards", "cache": tmp / "cache", "stdout": out, "shards": shards_in(tmp / "shards")}


# ---------------------------------------------------------------------------------------
# The shard writer, and gpt2.py's reader.
# ---------------------------------------------------------------------------------------
def test_write_shard_writes_an_llm_c_header_then_little_endian_uint16(tmp_path):
    path = tmp_path / "shard.bin"
    fineweb.write_shard(path, [fineweb.EOT, 0, 1, 65535])
    data = path.read_bytes()
    assert len(data) == 1024 + 2 * 4
    header = np.frombuffer(data[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 4] and not header[3:].any()
    assert np.frombuffer(data[1024:], dtype="<u2").tolist() == [50256, 0, 1, 65535]
    assert os.listdir(tmp_path) == ["shard.bin"]  # the .tmp it went through is gone


@pytest.mark.parametrize("bad_id", [65536, -1])
def test_write_shard_refuses_an_id_outside_uint16_naming_the_file(tmp_path, bad_id):
    path = tmp_path / "shard.bin"
    with pytest.raises(ValueError, match=re.escape(str(path))):
        fineweb.write_shard(path, [1, 2, bad_id])
    assert os.listdir(tmp_path) == []


def test_gpt2_read_shard_reads_what_write_shard_writes(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=1000)
    fineweb.write_shard(tmp_path / "shard.bin", tokens)
    assert np.array_equal(gpt2.read_shard(tmp_path / "shard.bin"), tokens)
    assert (fineweb.SHARD_MAGIC, fineweb.SHARD_VERSION, fineweb.HEADER_INTS) == (
        gpt2.SHARD_MAGIC, gpt2.SHARD_VERSION, gpt2.HEADER_INTS)


# ---------------------------------------------------------------------------------------
# A clean run: the shards are the documents, in order, in the format gpt2.py reads.
# ---------------------------------------------------------------------------------------
def test_file_list_comes_from_the_hubs_tree_api_across_pages(hub, parquet_files, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")  # a trailing slash is forgiven
    files = fineweb.list_files("sample-10BT", max_files=None)
    assert [f["name"] for f in files] == sorted(parquet_files)
    assert [f["size"] for f in files] == [len(data) for data in parquet_files.values()]
    assert [f["sha256"] for f in files] == [hashlib.sha256(d).hexdigest() for d in parquet_files.values()]
    assert len(hub.requests) == 2  # one page per file: the Link header was followed
    assert [f["name"] for f in fineweb.list_files("sample-10BT", max_files=1)] == sorted(parquet_files)[:1]


def test_shards_decode_back_to_the_original_documents(clean_run, documents, expected_tokens):
    tokens = np.concatenate([np.frombuffer(data[1024:], dtype="<u2") for data in clean_run["shards"].values()])
    assert np.array_equal(tokens, expected_tokens)
    text = tiktoken.get_encoding("gpt2").decode(tokens.tolist())
    assert text == "".join("<|endoftext|>" + doc for doc in documents)


def test_first_shard_is_val_and_token_counts_add_up(clean_run, documents, expected_tokens):
    names = list(clean_run["shards"])
    n = len(expected_tokens)
    assert len(names) == -(-n // SHARD_SIZE) == 9
    assert names == ["fineweb_edu_val_000000.bin"] + [f"fineweb_edu_train_{i:06d}.bin" for i in range(1, len(names))]
    counts = [len(gpt2.read_shard(clean_run["dir"] / name)) for name in names]
    assert counts == [SHARD_SIZE] * (len(names) - 1) + [n - SHARD_SIZE * (len(names) - 1)]
    bytes_total = sum(len(data) for data in clean_run["shards"].values())
    assert f"{len(documents):,} documents, {n:,} tokens in {len(names)} shards ({bytes_total:,} bytes)" in clean_run["stdout"]
    assert re.search(r"this run: [\d,]+ tokens in [\d.]+ s = [\d,]+ tokens/s", clean_run["stdout"])


def test_shards_are_valid_for_gpt2s_reader(clean_run):
    for name, data in clean_run["shards"].items():
        tokens = gpt2.read_shard(clean_run["dir"] / name)
        assert tokens.dtype == np.uint16 and tokens.tobytes() == data[1024:]
    assert len(shards.find_shards(clean_run["dir"], "val")) == 1


def test_downloads_are_deleted_once_tokenized(clean_run):
    assert not [p for p in clean_run["cache"].rglob("*") if p.is_file()]


def test_keep_parquet_keeps_the_downloads(tmp_path, hub, parquet_files):
    code, _, err = run_fineweb(tmp_path, hub, "--keep_parquet")
    assert code == 0, err
    for name, data in parquet_files.items():
        assert (tmp_path / "cache" / name).read_bytes() == data


def test_a_parquet_already_in_the_cache_is_read_from_there_and_kept(tmp_path, hub, parquet_files, clean_run):
    first = sorted(parquet_files)[0]
    mine = tmp_path / "cache" / first  # put there by the user (a copy of the dataset), not by fineweb.py
    mine.parent.mkdir(parents=True)
    mine.write_bytes(parquet_files[first])
    code, _, err = run_fineweb(tmp_path, hub)
    assert code == 0, err
    assert shards_in(tmp_path / "shards") == clean_run["shards"]
    assert hub.downloads(first) == []  # read where it was
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [mine]  # kept; the download deleted


@pytest.mark.parametrize("listed", [
    f"{HUB_DIR}/../../../escaped.parquet",  # up out of the cache folder
    "{own}",  # an absolute path: the user's own parquet file
    HUB_DIR + "\\..\\escaped.parquet",  # Windows' separator
    "C:/escaped.parquet",  # a drive letter
    f"{HUB_DIR}/./000_00000.parquet",  # not normalized
    "sample/100BT/000_00000.parquet",  # another sample's folder
])
def test_a_file_list_naming_a_file_outside_the_sample_folder_is_refused_and_nothing_is_written(
        tmp_path, parquet_files, local_hub, monkeypatch, run_main, listed):
    own = tmp_path / "mine" / "own.parquet"
    own.parent.mkdir()
    own.write_bytes(parquet_files[f"{HUB_DIR}/000_00000.parquet"])
    name = listed.format(own=own)
    hub = local_hub({name: own.read_bytes()}, **HUB)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert_one_error_line(run_main(fineweb.main, *fineweb_args(tmp_path)), f"'{name}'", HUB_DIR)
    assert own.read_bytes() == parquet_files[f"{HUB_DIR}/000_00000.parquet"]  # neither tokenized nor deleted
    assert os.listdir(tmp_path) == ["mine"]  # no shards, no cache, nothing outside them
    assert hub.paths == [TREE]  # the list, then nothing


def listing(*pages):
    """A route of LocalHub for the tree API: these bodies, page i linking to page i + 1."""
    def answer(hub, path):
        page = int(path.partition("?cursor=")[2] or 0)
        more = {"Link": f'<{hub.url}{TREE}?cursor={page + 1}>; rel="next"'} if page + 1 < len(pages) else {}
        return 200, more, pages[page].encode()
    return {TREE: answer}


FILE = {"type": "file", "path": f"{HUB_DIR}/000_00000.parquet", "size": 100}


@pytest.mark.parametrize("page, problem", [
    ({"error": "Repository not found"}, "not a list"),
    ([FILE, "000_00000.parquet"], "entry 2"),
    ([{"type": "file", "size": 100}], "path"),
    ([{**FILE, "size": None}], "size"),
    ([{**FILE, "size": "100"}], "size"),
    ([{**FILE, "lfs": {"oid": "not a sha256", "size": 100}}], "sha256"),
])
def test_a_file_list_that_is_not_the_hubs_is_one_user_error_before_any_download(local_hub, monkeypatch, page,
                                                                                 problem):
    hub = local_hub({}, root=RESOLVE, routes=listing(json.dumps(page)))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(plumbing.UserError, match="not the hub's file list") as error:
        fineweb.list_files("sample-10BT", max_files=None)
    assert TREE in str(error.value) and problem in str(error.value)
    assert hub.paths == [TREE]


def test_a_file_list_whose_next_page_is_one_already_read_stops_with_one_user_error(hub, monkeypatch):
    def back_to_the_first_page(hub, path):
        status, headers, body = tree_page(hub, path)
        if not headers and len(hub.requests) < 20:  # at most 20: a list that never ends would hang the test
            headers = {"Link": f'<{hub.url}{TREE}>; rel="next"'}
        return status, headers, body

    hub.routes[TREE] = back_to_the_first_page
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(plumbing.UserError, match="already read") as error:
        fineweb.list_files("sample-10BT", max_files=None)
    assert str(error.value).startswith(f"{hub.url}{TREE}?cursor=1: not the hub's file list (its next page, "
                                       f"{hub.url}{TREE}, was already read")
    assert len(hub.requests) == 2


# ---------------------------------------------------------------------------------------
# The plumbing gpt2.py and hellaswag.py import: download, atomic_write, cache_dir. In this
# process, against the fake hub, with URLs that are not the FineWeb-Edu list's.
# ---------------------------------------------------------------------------------------
SECOND = f"{HUB_DIR}/001_00000.parquet"


def test_download_of_unknown_size_resumes_a_dropped_connection_with_the_missing_bytes(tmp_path, hub, no_backoff):
    data = hub.files[SECOND]
    hub.faults[SECOND] = ["drop"]
    dest = tmp_path / "new" / "folder" / "file.parquet"
    assert plumbing.download(hub.url + RESOLVE + SECOND, dest) == dest  # no size: the Content-Length is
    assert dest.read_bytes() == data
    first, resumed = hub.downloads(SECOND)
    assert first is None and 0 < int(resumed[6:-1]) <= len(data) // 2  # after what had arrived
    assert no_backoff == [1]
    assert os.listdir(dest.parent) == ["file.parquet"]  # the .part was renamed


def test_download_follows_a_redirect_to_another_path(tmp_path, hub):
    data = hub.files[SECOND]
    dest = tmp_path / "file.parquet"
    plumbing.download(f"{hub.url}/moved/{SECOND}", dest, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data
    assert hub.paths == [f"/moved/{SECOND}", RESOLVE + SECOND]


def test_download_failing_its_sha256_deletes_the_part_with_one_user_error(tmp_path, hub, no_backoff):
    data = hub.files[SECOND]
    hub.faults[SECOND] = ["corrupt"]
    with pytest.raises(plumbing.UserError, match="sha256") as error:
        plumbing.download(hub.url + RESOLVE + SECOND, str(tmp_path / "file.parquet"),
                         sha256=hashlib.sha256(data).hexdigest())
    assert SECOND in str(error.value)
    assert os.listdir(tmp_path) == []  # no file, no .part: a rerun fetches it again
    assert len(hub.downloads(SECOND)) == 1 and no_backoff == []


def test_download_of_a_404_is_one_user_error_at_once(tmp_path, hub, no_backoff):
    with pytest.raises(plumbing.UserError, match="HTTP 404") as error:
        plumbing.download(f"{hub.url}/no/such/file", tmp_path / "file")
    assert f"{hub.url}/no/such/file" in str(error.value)
    assert len(hub.requests) == 1 and no_backoff == []  # no retries
    assert os.listdir(tmp_path) == []


def test_download_renames_a_complete_part_the_server_answers_416_to(tmp_path, hub):
    data = hub.files[SECOND]
    (tmp_path / "file.parquet.part").write_bytes(data)  # a run stopped before the rename
    plumbing.download(hub.url + RESOLVE + SECOND, tmp_path / "file.parquet")
    assert (tmp_path / "file.parquet").read_bytes() == data
    assert hub.downloads(SECOND) == [f"bytes={len(data)}-"]  # asked for nothing more


@pytest.mark.parametrize("part, size_known, asked", [
    ("longer than the file", False, ["bytes={long}-", None]),  # a 416, then from the start
    ("longer than the file", True, [None]),  # longer than `size`: not even asked
    ("ignored Range", False, ["bytes=4-"]),  # a 200 to a Range: the whole file
])
def test_download_starts_again_a_part_that_is_not_the_beginning_of_the_file(tmp_path, hub, no_backoff, part,
                                                                            size_known, asked):
    data = hub.files[SECOND]
    stale = data + b"junk" if part == "longer than the file" else b"junk"
    (tmp_path / "file.parquet.part").write_bytes(stale)
    if part == "ignored Range":
        hub.faults[SECOND] = ["whole"]
    plumbing.download(hub.url + RESOLVE + SECOND, tmp_path / "file.parquet", size=len(data) if size_known else None)
    assert (tmp_path / "file.parquet").read_bytes() == data
    assert hub.downloads(SECOND) == [r and r.format(long=len(stale)) for r in asked]


def test_atomic_write_keeps_the_old_file_and_no_tmp_when_the_writer_fails(tmp_path):
    path = tmp_path / "state.bin"
    with plumbing.atomic_write(path) as f:
        f.write(b"old")
    with pytest.raises(ZeroDivisionError), plumbing.atomic_write(str(path)) as f:
        f.write(b"half of the new")
        1 / 0
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.bin"]


def test_atomic_write_goes_through_a_new_tmp_file_of_its_own_process_beside_the_target(tmp_path):
    path = tmp_path / "state.json"
    with plumbing.atomic_write(path) as first, plumbing.atomic_write(path, "w") as second:
        tmps = os.listdir(tmp_path)
        first.write(b"the first writer's")
        second.write("the second writer's")
    pattern = re.compile(rf"state\.json\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp")
    assert len(set(tmps)) == 2 and all(map(pattern.fullmatch, tmps)), tmps  # two writers, two files
    assert path.read_bytes() == b"the first writer's"  # the last one to finish, whole and alone
    assert os.listdir(tmp_path) == ["state.json"]
    with plumbing.atomic_write(path, "w") as f:
        f.write("caf\u00e9")
    assert path.read_bytes() == b"caf\xc3\xa9"  # text mode writes UTF-8


def test_atomic_write_never_writes_through_a_link_planted_at_a_tmp_name(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    draws = iter(["deadbeef", "0badcafe"])
    monkeypatch.setattr("secrets.token_hex", lambda nbytes: next(draws))
    planted = ["state.bin.tmp", f"state.bin.{os.getpid()}.deadbeef.tmp"]  # the old fixed name, and the first draw
    for name in planted:
        (tmp_path / name).symlink_to(victim)
    with plumbing.atomic_write(tmp_path / "state.bin") as f:
        f.write(b"new state")
    assert victim.read_bytes() == b"precious"
    assert (tmp_path / "state.bin").read_bytes() == b"new state" and not (tmp_path / "state.bin").is_symlink()
    assert sorted(os.listdir(tmp_path)) == sorted(["state.bin", "victim.txt", *planted])  # not ours to delete


def test_two_processes_downloading_one_file_at_once_fetch_it_once_and_both_get_it(tmp_path, local_hub):
    data = np.random.default_rng(0).bytes(500_000)
    hub = local_hub({"big.bin": data})
    hub.faults["big.bin"] = ["slow", "slow"]  # 4 KB per 50 ms: ~6 s, while the other process starts
    dest = tmp_path / "cache" / "big.bin"
    script = ("import hashlib, sys, plumbing; "
              "print(hashlib.sha256(open(plumbing.download(sys.argv[1], sys.argv[2]), 'rb').read()).hexdigest())")
    runs = [subprocess.Popen([sys.executable, "-c", script, f"{hub.url}/big.bin", str(dest)], cwd=FINEWEB.parent,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    assert [out.strip() for out, _ in results] == [hashlib.sha256(data).hexdigest()] * 2
    assert hub.downloads("big.bin") == [None]  # one download, whole
    assert sum("another process is downloading" in err for _, err in results) == 1, results  # the other waited
    assert os.listdir(dest.parent) == ["big.bin"]  # no .part, no lock file


GPT2_WEIGHTS = (548_105_171, "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707")  # the hub's
# openai-community/gpt2 model.safetensors: its size and sha256, as the hub announces them


def test_a_mirror_serving_a_2_layer_model_as_gpt2_is_refused_by_the_hubs_size_header(tmp_path, local_hub):
    tools.save_pretrained(gpt2.GPT(gpt2.GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=16)),
                         tmp_path / "small")
    hub = local_hub({"model.safetensors": (tmp_path / "small" / "model.safetensors").read_bytes()},
                    root="/cdn/", linked={"model.safetensors": GPT2_WEIGHTS})
    dest = tmp_path / "cache" / "model.safetensors"
    with pytest.raises(plumbing.UserError, match="548,105,171") as error:
        plumbing.download(f"{hub.url}/moved/model.safetensors", dest)  # no size, no sha256: as gpt2.py asks
    assert "X-Linked-Size" in str(error.value)
    assert os.listdir(dest.parent) == []


def test_a_download_that_differs_from_the_hubs_x_linked_etag_is_refused_and_not_kept(tmp_path, hub, no_backoff):
    data = hub.files[SECOND]
    hub.linked[SECOND] = (len(data), hashlib.sha256(data).hexdigest())
    hub.faults[SECOND] = ["corrupt"]
    dest = tmp_path / "file.parquet"
    with pytest.raises(plumbing.UserError, match="sha256") as error:
        plumbing.download(f"{hub.url}/moved/{SECOND}", dest)
    assert "X-Linked-Etag" in str(error.value)
    assert os.listdir(tmp_path) == []
    plumbing.download(f"{hub.url}/moved/{SECOND}", dest)  # the right bytes pass: the quoted header is read right
    assert dest.read_bytes() == data


@pytest.mark.parametrize("cuts", [1, 100])
def test_a_body_cut_short_without_content_length_is_not_taken_whole_when_the_hub_gave_its_size(
        tmp_path, hub, no_backoff, cuts):
    data = hub.files[SECOND]
    hub.linked[SECOND] = (len(data), hashlib.sha256(data).hexdigest())
    hub.faults[SECOND] = ["cut"] * cuts  # half the body, no Content-Length: it looks complete
    dest = tmp_path / "file.parquet"
    if cuts == 1:
        plumbing.download(f"{hub.url}/moved/{SECOND}", dest)
        assert dest.read_bytes() == data
        assert hub.downloads(SECOND)[2:] == [f"bytes={len(data) // 2}-"] * 2  # resumed (the redirect, the file)
    else:
        with pytest.raises(plumbing.UserError, match="cannot download"):
            plumbing.download(f"{hub.url}/moved/{SECOND}", dest)
        assert not dest.exists()


def test_cache_dir_is_gpt2_under_xdg_cache_home_else_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert plumbing.cache_dir("hub", "x") == tmp_path / "gpt2" / "hub" / "x"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert plumbing.cache_dir("fineweb") == tmp_path / "home" / ".cache" / "gpt2" / "fineweb"
    assert not (tmp_path / "gpt2").exists()  # named, not made


# ---------------------------------------------------------------------------------------
# Interruptions: the job finishes, with the same bytes.
# ---------------------------------------------------------------------------------------
def test_download_survives_a_dropped_connection_and_a_503(tmp_path, hub, clean_run):
    name = f"{HUB_DIR}/001_00000.parquet"
    hub.faults[name] = ["drop", "503"]
    code, _, err = run_fineweb(tmp_path, hub)
    assert code == 0, err
    assert "retrying" in err
    first, *resumed = hub.downloads(name)
    assert first is None and len(resumed) == 2  # then resumed, not restarted, after what had arrived:
    assert resumed[0] == resumed[1] and 0 < int(resumed[0][6:-1]) <= len(hub.files[name]) // 2
    assert shards_in(tmp_path / "shards") == clean_run["shards"]


def test_rerun_of_a_finished_job_does_nothing(tmp_path, hub, clean_run):
    assert run_fineweb(tmp_path, hub)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").iterdir()}
    hub.requests.clear()
    code, out, _ = run_fineweb(tmp_path, hub)
    assert code == 0 and "nothing to do" in out
    assert hub.requests == []  # not even the file list: the manifest has it
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").iterdir()} == before


def start_and_stop_mid_way(tmp_path, hub):
    """Start `python fineweb.py` with the second file coming down a slow line; once it is surely
    mid-way (some shards of the first file written, the second file partly downloaded), return
    the process and the pids of its two tokenizer processes."""
    second = f"{HUB_DIR}/001_00000.parquet"
    hub.faults[second] = ["slow"]
    part = tmp_path / "cache" / f"{second}.part"
    manifest = tmp_path / "shards" / "manifest.json"
    run = subprocess.Popen([sys.executable, str(FINEWEB), *fineweb_args(tmp_path)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, **hub_env(hub)})
    deadline = time.time() + 60
    while not (manifest.exists() and json.loads(manifest.read_text())["shards"] and part.exists()
               and part.stat().st_size > 0):
        assert run.poll() is None and time.time() < deadline
        time.sleep(0.02)
    assert part.stat().st_size < len(hub.files[second])
    workers = [int(pid) for pid in Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()]
    assert len(workers) == 2  # --num_proc 2
    return run, workers


def is_running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def rerun_command(out_dir):
    """The arguments of the command fineweb.check_finished says finishes `out_dir`."""
    with pytest.raises(plumbing.UserError, match=f"^{re.escape(str(out_dir))} is not finished: ") as error:
        fineweb.check_finished(out_dir)
    command = re.search(r"rerun the same command to finish it: `python fineweb.py (.*)`$", str(error.value))
    return shlex.split(command[1])


def assert_rerun_finishes_the_job(tmp_path, hub, clean_run):
    state = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert not state["done"] and 0 < len(state["shards"]) < len(clean_run["shards"])
    command = rerun_command(tmp_path / "shards")  # what gpt2.py would tell the user, run as told
    assert command[command.index("--cache_dir") + 1] == str(tmp_path / "cache")
    code, out, err = run_script("fineweb.py", *command, env=hub_env(hub), timeout=120)
    assert code == 0, err
    assert "resuming after" in out
    assert shards_in(tmp_path / "shards") == clean_run["shards"]
    assert fineweb.check_finished(tmp_path / "shards") is None
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # the killed run's downloads too


def test_killed_run_finishes_on_rerun_with_identical_shards(tmp_path, hub, clean_run):
    run, workers = start_and_stop_mid_way(tmp_path, hub)
    run.kill()  # SIGKILL: no chance to clean up
    run.communicate(timeout=60)  # returns once the orphaned workers, which share stderr, exit too
    deadline = time.time() + 5
    while any(map(is_running, workers)):  # their last moments, after they closed their files
        assert time.time() < deadline, "the killed run left tokenizer processes behind"
        time.sleep(0.02)
    assert_rerun_finishes_the_job(tmp_path, hub, clean_run)
    assert hub.downloads(f"{HUB_DIR}/001_00000.parquet")[-1] is not None  # the .part was continued


def test_a_dead_tokenizer_process_stops_the_run_with_one_line(tmp_path, hub, clean_run):
    run, workers = start_and_stop_mid_way(tmp_path, hub)
    os.kill(workers[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    _, err = run.communicate(timeout=60)
    assert_one_error_line((run.returncode, "", err), "a tokenizer process died", alone=False)  # after downloads
    assert_rerun_finishes_the_job(tmp_path, hub, clean_run)


def test_a_full_disk_stops_with_one_line_and_the_rerun_finishes(tmp_path, clean_run, local_files, monkeypatch,
                                                                convert):
    # In this process, so that os.fsync can be made to fail as it does on a full disk. The
    # download's split (one whole shard), so that the shards are the clean run's.
    args = (tmp_path / "shards", local_files, "--val_size", str(SHARD_SIZE))
    real_fsync, calls = os.fsync, []

    def fsync_on_a_disk_that_fills_up(fd):
        calls.append(fd)
        if len(calls) == 4:  # the manifest, shard 0, the manifest, then shard 1 finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_on_a_disk_that_fills_up)
    assert_one_error_line(convert(*args), "fineweb_edu_train_000001.bin:", "No space left on device")
    assert sorted(os.listdir(tmp_path / "shards")) == ["fineweb_edu_val_000000.bin", "manifest.json"]
    assert shards_in(tmp_path / "shards")["fineweb_edu_val_000000.bin"] == clean_run["shards"]["fineweb_edu_val_000000.bin"]

    monkeypatch.setattr(os, "fsync", real_fsync)
    assert convert(*args)[0] == 0
    assert shards_in(tmp_path / "shards") == clean_run["shards"]


def test_check_finished_refuses_a_folder_fineweb_py_stopped_in_and_its_command_finishes_it(
        tmp_path, clean_run, local_files, monkeypatch, convert, run_main, disk_full_at):
    out_dir = tmp_path / "shards"
    real_write_shard = disk_full_at("_000005.bin")
    assert convert(out_dir, local_files, "--val_size", str(SHARD_SIZE))[0] == 1
    with pytest.raises(plumbing.UserError) as error:
        fineweb.check_finished(str(out_dir))
    assert str(error.value).startswith(f"{out_dir} is not finished: fineweb.py wrote 5 shards and stopped in "
                                       "file 2 of its 2 input files; rerun the same command")
    monkeypatch.setattr(fineweb, "write_shard", real_write_shard)
    assert run_main(fineweb.main, *rerun_command(out_dir))[0] == 0
    assert shards_in(out_dir) == clean_run["shards"]
    assert fineweb.check_finished(out_dir) is None


def test_check_finished_passes_a_finished_folder_and_shards_fineweb_py_did_not_write(tmp_path, local_files,
                                                                                     convert):
    assert convert(tmp_path / "ours", local_files[:1])[0] == 0
    assert fineweb.check_finished(tmp_path / "ours") is None
    (tmp_path / "theirs").mkdir()
    fineweb.write_shard(tmp_path / "theirs" / "train_000001.bin", [1, 2, 3])  # from llm.c, say: no manifest
    assert fineweb.check_finished(tmp_path / "theirs") is None


@pytest.mark.parametrize("damage", ["cut short", "a list", "no shards", "a shard's name leaves the folder"])
def test_an_unreadable_manifest_is_one_line_naming_it_and_how_to_start_over(tmp_path, shakespeare, convert,
                                                                            damage):
    (tmp_path / "a.txt").write_text(shakespeare[:5000])
    out_dir = tmp_path / "shards"
    assert convert(out_dir, [tmp_path / "a.txt"])[0] == 0
    path = out_dir / "manifest.json"
    text, manifest = path.read_text(), json.loads(path.read_text())
    if damage == "cut short":
        text = text[:len(text) // 2]
    elif damage == "a list":
        text = "[]"
    else:
        if damage == "no shards":
            del manifest["shards"]
        else:
            manifest["shards"][0]["name"] = "../elsewhere.bin"
        text = json.dumps(manifest)
    path.write_text(text)
    before = shards_in(out_dir)
    assert_one_error_line(convert(out_dir, [tmp_path / "a.txt"]), str(path), "move it away",
                          f"delete {out_dir} to start over")
    with pytest.raises(plumbing.UserError, match="move it away"):
        fineweb.check_finished(out_dir)
    assert shards_in(out_dir) == before and path.read_text() == text  # nothing touched


# ---------------------------------------------------------------------------------------
# Errors: one clear line, exit code 1, the shards already written intact.
# ---------------------------------------------------------------------------------------
class TokenizerWithTooBigAnId:
    """Stands in for tiktoken's GPT-2 encoding: every document becomes the id 70,000."""

    def encode_to_numpy(self, text, disallowed_special):
        return np.array([70_000], dtype=np.uint32)


def test_a_token_id_outside_uint16_stops_with_one_line_naming_the_file(tmp_path, local_files, monkeypatch, convert):
    # In this process: the tokenizer processes fork from it and find the stand-in.
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: TokenizerWithTooBigAnId())
    assert_one_error_line(convert(tmp_path / "shards", local_files[:1]),
                          str(local_files[0]), "token id 70000 does not fit")
    assert not shards_in(tmp_path / "shards")


def without_text(data):
    table = pq.read_table(pa.BufferReader(data)).drop_columns(["text"])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("problem, message", [
    ("404", "HTTP 404"),
    ("truncated", "not a readable parquet file"),
    ("no text", "no 'text' column"),
])
def test_a_bad_second_file_stops_with_one_line_and_keeps_earlier_shards(tmp_path, hub, clean_run, problem, message):
    second = f"{HUB_DIR}/001_00000.parquet"
    if problem == "404":
        hub.faults[second] = ["404"]
    elif problem == "truncated":
        hub.files[second] = hub.files[second][:len(hub.files[second]) // 2]
    else:
        hub.files[second] = without_text(hub.files[second])
    assert_one_error_line(run_fineweb(tmp_path, hub), "001_00000.parquet", message, alone=False)
    written = shards_in(tmp_path / "shards")
    assert 0 < len(written) <= 4  # the first file's 89,438 tokens make at most 4 full shards
    assert written == dict(list(clean_run["shards"].items())[:len(written)])
    if problem == "404":
        assert len(hub.downloads(second)) == 1  # at once: no retries


def test_a_corrupted_download_fails_its_sha256_check(tmp_path, hub):
    second = f"{HUB_DIR}/001_00000.parquet"
    hub.faults[second] = ["corrupt"]
    assert_one_error_line(run_fineweb(tmp_path, hub), "001_00000.parquet", "sha256", alone=False)
    assert not (tmp_path / "cache" / f"{second}.part").exists()  # deleted, so a rerun fetches it again
    assert run_fineweb(tmp_path, hub)[0] == 0


def test_a_rerun_with_another_shard_size_refuses_to_mix_shards(tmp_path, hub, clean_run):
    out_dir = tmp_path / "copy"
    shutil.copytree(clean_run["dir"], out_dir)
    run = run_fineweb(tmp_path, hub, "--out_dir", str(out_dir), "--shard_size", "30000")
    assert_one_error_line(run, str(out_dir), "--out_dir")
    assert shards_in(out_dir) == clean_run["shards"]


# ---------------------------------------------------------------------------------------
# The shards depend on the documents only.
# ---------------------------------------------------------------------------------------
def test_input_gives_the_same_shards_as_the_download(tmp_path, local_files, clean_run):
    # No hub: no network. The download's split (one whole shard); --input's default is 10%.
    code, _, err = run_fineweb(tmp_path, None, "--input", *map(str, local_files), "--val_size", str(SHARD_SIZE))
    assert code == 0, err
    assert shards_in(tmp_path / "shards") == clean_run["shards"]
    assert all(p.exists() for p in local_files)  # a user's own files are never deleted


def test_shards_do_not_depend_on_num_proc_or_batch_size(tmp_path, hub, clean_run):
    code, _, err = run_fineweb(tmp_path, hub, "--num_proc", "1", "--docs_per_batch", "7")
    assert code == 0, err
    assert shards_in(tmp_path / "shards") == clean_run["shards"]


def test_help_gives_every_flags_default_and_the_value_a_run_without_it_gets(capsys):
    with pytest.raises(SystemExit):
        fineweb.parse_args(["--help"])
    entries = re.split(r"\n  (?=--)", capsys.readouterr().out)[1:]  # one per flag, after --help's
    defaults = vars(fineweb.parse_args([]))
    assert len(entries) == len(defaults) == 11
    for entry in entries:
        flag, said = re.match(r"--(\w+)", entry)[1], " ".join(entry.split())
        assert "(default: " in said, entry
        if defaults[flag] not in (None, False):  # those say in words what happens instead
            assert f"(default: {defaults[flag]}" in said, (flag, defaults[flag], said)


# ---------------------------------------------------------------------------------------
# Your own text: .txt, .jsonl and .parquet, mixed, with a validation split for small inputs.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def enc():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def shakespeare(samples):
    return (samples / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def sample_texts(samples):
    """The 150 FineWeb-Edu documents of the sample parquet file."""
    return pq.read_table(samples / SAMPLE)["text"].to_pylist()


def encoding(enc, texts):
    """What the shards of these documents must hold: <|endoftext|> then the document, for each."""
    return np.concatenate([[fineweb.EOT, *enc.encode_ordinary(text)] for text in texts]).astype(np.uint16)


def token_stream(out_dir):
    """The tokens of all the shards in out_dir, in shard order."""
    return np.concatenate([np.frombuffer(data[1024:], dtype="<u2") for data in shards_in(out_dir).values()])


def write_jsonl(path, documents, field="text"):
    path.write_text("".join(json.dumps({"id": i, field: text}) + "\n" for i, text in enumerate(documents)),
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("shard_size, val_tokens", [(100_000_000, 33_803), (SHARD_SIZE, SHARD_SIZE)])
def test_tiny_shakespeare_txt_gives_val_then_train_shards_holding_its_exact_gpt2_encoding(
        tmp_path, samples, shakespeare, enc, shard_size, val_tokens):
    expected = encoding(enc, [shakespeare])  # one file, one document
    assert val_tokens == min(shard_size, -(-len(expected) // 10))  # 10% of the tokens, at most a shard
    code, out, err = run_fineweb(tmp_path, None, "--input", str(samples / "tinyshakespeare.txt"),
                                 "--shard_size", str(shard_size))
    assert code == 0, err
    written = shards_in(tmp_path / "shards")
    names = list(written)
    assert names == ["fineweb_edu_val_000000.bin"] + [f"fineweb_edu_train_{i:06d}.bin" for i in range(1, len(names))]
    sizes = [len(gpt2.read_shard(tmp_path / "shards" / name)) for name in names]
    assert sizes[0] == val_tokens and sum(sizes) == len(expected)
    assert all(size == shard_size for size in sizes[1:-1]) and 0 < sizes[-1] <= shard_size
    assert np.array_equal(token_stream(tmp_path / "shards"), expected)
    assert len(shards.find_shards(tmp_path / "shards", "val")) == 1
    assert len(shards.find_shards(tmp_path / "shards", "train")) == len(names) - 1 >= 1
    assert f"validation: {val_tokens:,} tokens" in out


def test_mixed_txt_jsonl_parquet_give_the_token_stream_of_each_converted_alone_in_order(
        tmp_path, samples, shakespeare, sample_texts, enc):
    txt = tmp_path / "verse.txt"
    txt.write_text(shakespeare[:30_000], encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "docs.jsonl", sample_texts[:40])
    inputs = [txt, jsonl, samples / SAMPLE]
    code, _, err = run_fineweb(tmp_path, None, "--input", *map(str, inputs))
    assert code == 0, err
    mixed = token_stream(tmp_path / "shards")
    alone = []
    for i, path in enumerate(inputs):
        code, _, err = run_fineweb(tmp_path, None, "--input", str(path), "--out_dir", str(tmp_path / f"alone{i}"))
        assert code == 0, err
        alone.append(token_stream(tmp_path / f"alone{i}"))
    assert np.array_equal(mixed, np.concatenate(alone))
    assert np.array_equal(mixed, encoding(enc, [shakespeare[:30_000], *sample_texts[:40], *sample_texts]))
    val = len(gpt2.read_shard(tmp_path / "shards" / "fineweb_edu_val_000000.bin"))
    assert val == -(-len(mixed) // 10) < SHARD_SIZE  # 10% of the tokens, with shards of 20,000


def test_text_field_names_the_jsonl_field_and_the_parquet_column(tmp_path, sample_texts, enc, convert):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", sample_texts[:5], field="content")
    table = pa.table({"content": sample_texts[5:10], "text": ["not this"] * 5})
    pq.write_table(table, tmp_path / "docs.parquet")
    assert convert(tmp_path / "shards", [jsonl, tmp_path / "docs.parquet"], "--text_field", "content")[0] == 0
    assert np.array_equal(token_stream(tmp_path / "shards"), encoding(enc, sample_texts[:10]))


def test_a_utf8_byte_order_mark_and_blank_jsonl_lines_are_not_text(tmp_path, enc, convert):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfTo be, or not to be")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "that is"}\n\n  \n{"text": "the question"}\r\n')
    assert convert(tmp_path / "shards", [tmp_path / "a.txt", tmp_path / "b.jsonl"])[0] == 0
    assert np.array_equal(token_stream(tmp_path / "shards"),
                          encoding(enc, ["To be, or not to be", "that is", "the question"]))


GOOD_LINE = b'{"text": "caf\xc3\xa9 society"}\n'  # 26 bytes, with a two-byte UTF-8 character


@pytest.mark.parametrize("name, data, flags, fragments", [
    ("bad.txt", b"some text\x00\x01\x02", [], ["bad.txt", "binary file", "byte offset 9"]),
    ("bad.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", [], ["bad.jsonl", "binary file", "byte offset 8"]),
    ("bad.jsonl", GOOD_LINE * 1000 + b'{"text": "a\x00"}\n', [], ["bad.jsonl line 1001", "binary", "offset 26011"]),
    ("bad.txt", "café".encode() + b" \xff rest", [], ["bad.txt", "invalid UTF-8 at byte offset 6"]),
    ("bad.jsonl", GOOD_LINE + b'{"text": "caf\xe9"}\n', [], ["bad.jsonl line 2", "invalid UTF-8 at byte offset 39"]),
    ("bad.jsonl", GOOD_LINE + b"\n" + b'{"body": "no text here"}\n', [],
     ["bad.jsonl line 3", "no 'text' field (it has: body)", "--text_field"]),
    ("bad.jsonl", GOOD_LINE + b"{'text': 'single quotes'}\n", [],
     ["bad.jsonl line 2", "not JSON (Expecting property name enclosed in double quotes: column 2)"]),
    ("bad.jsonl", GOOD_LINE + b'["text", "a list"]\n', [], ["bad.jsonl line 2", "an array, not a JSON object"]),
    ("bad.jsonl", GOOD_LINE + b'{"text": 42}\n', [], ["bad.jsonl line 2", "'text' field holds a number"]),
    ("bad.jsonl", GOOD_LINE + b'{"text": "half a pair \\ud83d"}\n', [], ["bad.jsonl line 2", "lone UTF-16 surrogate"]),
    ("bad.txt", b"", [], ["bad.txt", "empty file"]),
    ("bad.jsonl", b"\n \n", [], ["bad.jsonl", "no documents"]),
    ("bad.parquet", None, [], ["bad.parquet", "no documents (0 rows)"]),
    ("bad.csv", b"text\nhello\n", [], ["bad.csv", "--input takes .parquet, .jsonl, .txt"]),
    ("missing.txt", None, [], ["missing.txt", "no such file"]),
    ("bad.jsonl", b'{"text": ""}\n', [], ["the input holds 1 tokens", "too few"]),
])
def test_a_bad_input_stops_with_one_line_and_writes_nothing(tmp_path, convert, name, data, flags, fragments):
    good = tmp_path / "good.txt"
    good.write_text("A good file first: the run must not have written its tokens.")
    bad = tmp_path / name
    if name == "bad.parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), bad)
    elif data is not None:
        bad.write_bytes(data)
    inputs = [bad] if "too few" in fragments else [good, bad]
    assert_one_error_line(convert(tmp_path / "shards", inputs, *flags), *fragments)
    assert not (tmp_path / "shards").exists()  # no manifest, no shard: nothing for a rerun to trust


def test_a_val_size_that_leaves_nothing_to_train_on_is_refused(tmp_path, convert):
    (tmp_path / "a.txt").write_text("Only a few tokens here.")  # 6 tokens, after <|endoftext|>
    assert_one_error_line(convert(tmp_path / "shards", [tmp_path / "a.txt"], "--val_size", "7"),
                          "holds 7 tokens", "too few for a validation split of 7")
    assert not (tmp_path / "shards").exists()
    assert convert(tmp_path / "shards", [tmp_path / "a.txt"], "--val_size", "6")[0] == 0
    assert [(len(data) - 1024) // 2 for data in shards_in(tmp_path / "shards").values()] == [6, 1]


def test_after_a_missing_field_error_the_rerun_with_text_field_is_not_refused(tmp_path, sample_texts, enc, convert):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", sample_texts[:3], field="body")
    assert_one_error_line(convert(tmp_path / "shards", [jsonl]),
                          "docs.jsonl line 1", "no 'text' field (it has: id, body)")
    assert convert(tmp_path / "shards", [jsonl], "--text_field", "body")[0] == 0
    assert np.array_equal(token_stream(tmp_path / "shards"), encoding(enc, sample_texts[:3]))


@pytest.fixture(scope="session")
def jsonl_then_txt(samples, sample_texts, tmp_path_factory):
    """150 documents in a .jsonl (~89,000 tokens), then a book in a .txt (~338,000 tokens), and
    the shards of an uninterrupted run: 10% would be ~43,000 tokens, so val is one shard."""
    tmp = tmp_path_factory.mktemp("jsonl_then_txt")
    inputs = [write_jsonl(tmp / "docs.jsonl", sample_texts), samples / "tinyshakespeare.txt"]
    assert fineweb.main(input_args(tmp / "shards", inputs)) == 0
    return inputs, shards_in(tmp / "shards")


@pytest.mark.parametrize("failing_shard, file, inside", [(2, 0, "row"), (8, 1, "skip")])
def test_a_run_stopped_inside_a_jsonl_or_a_txt_finishes_on_rerun_with_identical_shards(
        tmp_path, jsonl_then_txt, monkeypatch, convert, failing_shard, file, inside):
    inputs, clean = jsonl_then_txt
    assert len(clean) > failing_shard + 1
    real_write_shard = fineweb.write_shard

    def write_shard_on_a_disk_that_fills_up(path, tokens):
        if f"_{failing_shard:06d}.bin" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{path}.tmp")
        real_write_shard(path, tokens)

    monkeypatch.setattr(fineweb, "write_shard", write_shard_on_a_disk_that_fills_up)
    assert_one_error_line(convert(tmp_path / "shards", inputs), "No space left on device")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert len(manifest["shards"]) == failing_shard and manifest["val_tokens"] == SHARD_SIZE
    next_file, next_row, next_skip = manifest["shards"][-1]["next"]
    assert next_file == file and {"row": next_row, "skip": next_skip}[inside] > 0  # mid-file, as meant

    monkeypatch.setattr(fineweb, "write_shard", real_write_shard)
    code, out, _ = convert(tmp_path / "shards", inputs)
    assert code == 0
    assert "resuming after" in out
    assert shards_in(tmp_path / "shards") == clean


def test_the_count_stops_once_it_has_enough_tokens_to_decide_the_split(tmp_path, sample_texts, enc):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", sample_texts)
    args = fineweb.parse_args(["--input", str(jsonl), *FLAGS])
    batches = [encoding(enc, sample_texts[i:i + 32]) for i in range(0, len(sample_texts), 32)]
    with concurrent.futures.ProcessPoolExecutor(1, initializer=fineweb.init_worker) as pool:
        files = [{"path": str(jsonl)}]
        assert fineweb.count_input(args, files, pool, enough=10**9) == sum(map(len, batches))
        # The first batches that reach 30,000 tokens, and no more: a big input is not read twice.
        reached = np.cumsum(list(map(len, batches)))
        assert fineweb.count_input(args, files, pool, enough=30_000) == reached[reached >= 30_000][0] < reached[-1]


def test_a_rerun_with_another_val_size_refuses_to_mix_shards(tmp_path, shakespeare, convert):
    (tmp_path / "a.txt").write_text(shakespeare[:5000])
    assert convert(tmp_path / "shards", [tmp_path / "a.txt"])[0] == 0
    before = shards_in(tmp_path / "shards")
    code, out, _ = convert(tmp_path / "shards", [tmp_path / "a.txt"], "--val_size", "10.0%")  # the default, said so
    assert code == 0
    assert "nothing to do" in out
    assert_one_error_line(convert(tmp_path / "shards", [tmp_path / "a.txt"], "--val_size", "20%"),
                          str(tmp_path / "shards"), '"val_size": "10%"', "--out_dir")
    assert shards_in(tmp_path / "shards") == before


@pytest.mark.parametrize("argv, message", [
    (["--val_size", "10%"], "a percentage needs --input"),
    (["--input", "a.txt", "--val_size", "100%"], "below 100%"),
    (["--input", "a.txt", "--val_size", "0"], "from 1 to --shard_size"),
    (["--input", "a.txt", "--shard_size", "1000", "--val_size", "1001"], "from 1 to --shard_size (1000)"),
    (["--input", "a.txt", "--val_size", "ten"], "a number of tokens (1000000) or a percentage (10%)"),
    (["--text_field", "body"], "--text_field is for --input"),
    (["--input", "a.txt", "--shard_size", "0"], "--shard_size must be at least 1"),
    (["--input", "a.txt", "--num_proc", "0"], "--num_proc must be at least 1"),
    (["--input", "a.txt", "--val_size", "200%"], "below 100%"),
])
def test_a_val_size_or_text_field_that_cannot_apply_is_one_error_line(capsys, argv, message):
    assert fineweb.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: fineweb.py: ") and message in err, err
