"""Tests for fineweb.py, offline, as worked examples.

A stand-in for the Hugging Face hub runs on 127.0.0.1 (`FakeHub`): it answers the tree API
(one file per page, so the pagination is exercised) and serves two real FineWeb-Edu parquet
files under the hub's paths, with HTTP Range support and faults to inject on demand (a
connection dropped halfway, a 503, a 404, a slow line, corrupted bytes). The two files are the
150 documents of samples/fineweb_edu_sample10BT_150.parquet as they are (one row group)
and the same documents rewritten with row groups of 16 rows, so that reading by row groups,
resuming inside a file and crossing from one file to the next are all on the path.

fineweb.py runs as the user runs it, `python fineweb.py ...` in a subprocess with HF_ENDPOINT
pointed at the fake hub, with shards of 20,000 tokens: ~180,000 tokens make 9 shards.
"""
import collections
import errno
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import fineweb
import gpt2

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
class FakeHub:
    """huggingface.co's tree API and resolve/ downloads, on 127.0.0.1, with injected faults.

    `faults[name]` is a list of faults for the next requests of that file, used up one per
    request: "drop" (send half the bytes, then close), "503", "404", "slow" (a slow line),
    "corrupt" (flip a byte). `requests` logs (path, Range header) for every request."""

    def __init__(self, files):
        self.files = files
        self.faults = collections.defaultdict(list)
        self.requests = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range")))
                tree = f"/api/datasets/HuggingFaceFW/fineweb-edu/tree/main/{HUB_DIR}"
                resolve = "/datasets/HuggingFaceFW/fineweb-edu/resolve/main/"
                try:
                    if self.path.startswith(tree):
                        self.tree_page(tree)
                    elif self.path.startswith(resolve) and self.path[len(resolve):] in hub.files:
                        self.download(self.path[len(resolve):])
                    else:
                        self.send_error(404)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed: that is what some tests do

            def tree_page(self, tree):
                """One file per page, the next page behind a Link header, as the hub paginates."""
                names = sorted(hub.files)
                page = int(self.path.partition("?cursor=")[2] or 0)
                data = hub.files[names[page]]
                entry = {"type": "file", "oid": "0" * 40, "size": len(data), "path": names[page],
                         "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                self.send_response(200)
                if page + 1 < len(names):
                    self.send_header("Link", f'<{hub.url}{tree}?cursor={page + 1}>; rel="next"')
                self.reply(json.dumps([entry]).encode())

            def download(self, name):
                fault = hub.faults[name].pop(0) if hub.faults[name] else None
                if fault in ("404", "503"):
                    return self.send_error(int(fault))
                data = hub.files[name]
                if fault == "corrupt":
                    data = bytes([data[0] ^ 1]) + data[1:]
                start = int(re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "bytes=0-")[1])
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                body = data[start:]
                if fault == "drop":
                    return self.reply(body, cut=len(body) // 2)
                self.reply(body, pace=0.05 if fault == "slow" else 0)

            def reply(self, body, cut=None, pace=0):
                """Send `body` (headers first); stop after `cut` bytes, or send 4 KB per `pace` s."""
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if pace:
                    for i in range(0, len(body), 4096):
                        self.wfile.write(body[i:i + 4096])
                        time.sleep(pace)
                else:
                    self.wfile.write(body[:cut])

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def downloads(self, name):
        """The Range headers of the requests for one file."""
        return [rng for path, rng in self.requests if path.endswith(name)]


@pytest.fixture
def hub(parquet_files):
    hub = FakeHub(dict(parquet_files))
    yield hub
    hub.close()


# ---------------------------------------------------------------------------------------
# Running fineweb.py and reading what it wrote.
# ---------------------------------------------------------------------------------------
def fineweb_command(tmp, *flags):
    return [sys.executable, str(FINEWEB), "--out_dir", str(tmp / "shards"), "--cache_dir", str(tmp / "cache"),
            *FLAGS, *flags]


def hub_env(hub):
    """The environment of a run: HF_ENDPOINT at the fake hub, or (no hub) at a closed port."""
    return dict(os.environ, HF_ENDPOINT=hub.url if hub else "http://127.0.0.1:9")


def run_fineweb(tmp, hub, *flags):
    """Run `python fineweb.py` as a user would; return (exit code, stdout, stderr)."""
    done = subprocess.run(fineweb_command(tmp, *flags), env=hub_env(hub), capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stdout, done.stderr


def shards_in(out_dir):
    """{name: bytes} of every shard in out_dir, in shard order (val 0, train 1, 2, ...)."""
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).glob("fineweb_edu_*.bin"), key=lambda p: p.stem[-6:])}


def assert_one_error_line(stderr, *fragments):
    """A user's error: a single `error: ...` line that names what is wrong, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


@pytest.fixture(scope="session")
def clean_run(parquet_files, tmp_path_factory):
    """An uninterrupted download-and-tokenize run: the reference every other run must match."""
    tmp = tmp_path_factory.mktemp("clean")
    hub = FakeHub(dict(parquet_files))
    try:
        code, out, err = run_fineweb(tmp, hub)
    finally:
        hub.close()
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
    assert len(gpt2.find_shards(clean_run["dir"], "val")) == 1


def test_downloads_are_deleted_once_tokenized(clean_run):
    assert not [p for p in clean_run["cache"].rglob("*") if p.is_file()]


def test_keep_parquet_keeps_the_downloads(tmp_path, hub, parquet_files):
    code, _, err = run_fineweb(tmp_path, hub, "--keep_parquet")
    assert code == 0, err
    for name, data in parquet_files.items():
        assert (tmp_path / "cache" / name).read_bytes() == data


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
    run = subprocess.Popen(fineweb_command(tmp_path), env=hub_env(hub), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
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


def assert_rerun_finishes_the_job(tmp_path, hub, clean_run):
    state = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert not state["done"] and 0 < len(state["shards"]) < len(clean_run["shards"])
    code, out, err = run_fineweb(tmp_path, hub)
    assert code == 0, err
    assert "resuming after" in out
    assert shards_in(tmp_path / "shards") == clean_run["shards"]


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
    assert run.returncode == 1
    assert_one_error_line(err, "a tokenizer process died")
    assert_rerun_finishes_the_job(tmp_path, hub, clean_run)


def test_a_full_disk_stops_with_one_line_and_the_rerun_finishes(tmp_path, clean_run, local_files, monkeypatch,
                                                                capsys):
    # In this process, so that os.fsync can be made to fail as it does on a full disk.
    argv = ["--input", *map(str, local_files), "--out_dir", str(tmp_path / "shards"), *FLAGS]
    real_fsync, calls = os.fsync, []

    def fsync_on_a_disk_that_fills_up(fd):
        calls.append(fd)
        if len(calls) == 4:  # the manifest, shard 0, the manifest, then shard 1 finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_on_a_disk_that_fills_up)
    assert fineweb.main(argv) == 1
    assert_one_error_line(capsys.readouterr().err, "fineweb_edu_train_000001.bin.tmp", "No space left on device")
    assert sorted(os.listdir(tmp_path / "shards")) == ["fineweb_edu_val_000000.bin", "manifest.json"]
    assert shards_in(tmp_path / "shards")["fineweb_edu_val_000000.bin"] == clean_run["shards"]["fineweb_edu_val_000000.bin"]

    monkeypatch.setattr(os, "fsync", real_fsync)
    assert fineweb.main(argv) == 0
    assert shards_in(tmp_path / "shards") == clean_run["shards"]


# ---------------------------------------------------------------------------------------
# Errors: one clear line, exit code 1, the shards already written intact.
# ---------------------------------------------------------------------------------------
class TokenizerWithTooBigAnId:
    """Stands in for tiktoken's GPT-2 encoding: every document becomes the id 70,000."""

    def encode_to_numpy(self, text, disallowed_special):
        return np.array([70_000], dtype=np.uint32)


def test_a_token_id_outside_uint16_stops_with_one_line_naming_the_file(tmp_path, local_files, monkeypatch, capsys):
    # In this process: the tokenizer processes fork from it and find the stand-in.
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: TokenizerWithTooBigAnId())
    assert fineweb.main(["--input", str(local_files[0]), "--out_dir", str(tmp_path / "shards"), *FLAGS]) == 1
    assert_one_error_line(capsys.readouterr().err, str(local_files[0]), "token id 70000 does not fit")
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
    code, _, err = run_fineweb(tmp_path, hub)
    assert code == 1
    assert_one_error_line(err, "001_00000.parquet", message)
    written = shards_in(tmp_path / "shards")
    assert 0 < len(written) <= 4  # the first file's 89,438 tokens make at most 4 full shards
    assert written == dict(list(clean_run["shards"].items())[:len(written)])
    if problem == "404":
        assert len(hub.downloads(second)) == 1  # at once: no retries


def test_a_corrupted_download_fails_its_sha256_check(tmp_path, hub):
    second = f"{HUB_DIR}/001_00000.parquet"
    hub.faults[second] = ["corrupt"]
    code, _, err = run_fineweb(tmp_path, hub)
    assert code == 1
    assert_one_error_line(err, "001_00000.parquet", "sha256")
    assert not (tmp_path / "cache" / f"{second}.part").exists()  # deleted, so a rerun fetches it again
    assert run_fineweb(tmp_path, hub)[0] == 0


def test_a_rerun_with_another_shard_size_refuses_to_mix_shards(tmp_path, hub, clean_run):
    out_dir = tmp_path / "copy"
    shutil.copytree(clean_run["dir"], out_dir)
    done = subprocess.run(fineweb_command(tmp_path, "--out_dir", str(out_dir), "--shard_size", "30000"),
                          env=hub_env(hub), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert_one_error_line(done.stderr, str(out_dir), "--out_dir")
    assert shards_in(out_dir) == clean_run["shards"]


# ---------------------------------------------------------------------------------------
# The shards depend on the documents only.
# ---------------------------------------------------------------------------------------
def test_input_gives_the_same_shards_as_the_download(tmp_path, local_files, clean_run):
    code, _, err = run_fineweb(tmp_path, None, "--input", *map(str, local_files))  # no hub: no network
    assert code == 0, err
    assert shards_in(tmp_path / "shards") == clean_run["shards"]
    assert all(p.exists() for p in local_files)  # a user's own files are never deleted


def test_shards_do_not_depend_on_num_proc_or_batch_size(tmp_path, hub, clean_run):
    code, _, err = run_fineweb(tmp_path, hub, "--num_proc", "1", "--docs_per_batch", "7")
    assert code == 0, err
    assert shards_in(tmp_path / "shards") == clean_run["shards"]


def test_help_gives_every_flags_default(capsys):
    with pytest.raises(SystemExit):
        fineweb.parse_args(["--help"])
    entries = re.split(r"\n  (?=--)", capsys.readouterr().out)[1:]  # one per flag, after --help's
    assert len(entries) == 9
    for entry in entries:
        assert "(default:" in entry, entry
