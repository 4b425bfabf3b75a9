"""pytest setup shared by every test file: the offline tokenizer, the real test data, a local
web server standing in for the hub and GitHub, and the ways to run a script and judge its errors.

The test data lives in the repository (samples/, see its README): a fresh clone tests itself.
tiktoken downloads the GPT-2 BPE files on first use; where there is no network (this project's
CI) a read-only copy sits in ../shared/tiktoken_cache, and we point tiktoken at it when it exists
and TIKTOKEN_CACHE_DIR is not already set.
"""
import collections
import contextlib
import errno
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

import checkpoints
import cli
import fineweb
import gpt2
import training
from fineweb import write_shard

ROOT = Path(__file__).resolve().parent
SAMPLES = ROOT / "samples"
TIKTOKEN_CACHE = ROOT.parent / "shared" / "tiktoken_cache"

if "TIKTOKEN_CACHE_DIR" not in os.environ and TIKTOKEN_CACHE.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_CACHE)

real_sleep = time.sleep  # the server's own pauses, whatever a test does to time.sleep (no_backoff)
ENDLESS_SECONDS = 10  # the longest a LocalHub answers "endless" or "trickle" (the client gone, it stops sooner)
TRICKLE_PACE = 0.1  # seconds between the bytes of a "trickle"


@pytest.fixture(scope="session")
def samples() -> Path:
    """The repository's folder of real test data (FineWeb-Edu, HellaSwag, Tiny Shakespeare)."""
    return SAMPLES


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where there is none "
                                       "(run them alone with `python -m pytest -q -m gpu`)")
    config.addinivalue_line("markers", "slow: a long end-to-end check (minutes on 2 cores), left "
                                       "out of the default run: `python -m pytest -q -m slow`")
    if not config.option.markexpr:  # the default run; any -m given chooses for itself
        config.option.markexpr = "not slow"


# ---------------------------------------------------------------------------------------
# A local server for the hub's and GitHub's files, with faults to inject on demand.
# ---------------------------------------------------------------------------------------
class LocalHub:
    """A web server on 127.0.0.1 at `url`: `files[name]` (bytes) is served at `root + name`, with
    HTTP Range (206 and a Content-Range; 416 past the end, as the hub answers), and
    `/moved/<name>` redirects (302) to it, as the hub redirects to its CDN. Anything else is 404,
    unless `routes` answers it: {path prefix: answer(hub, path) -> (status, headers, body)}.
    `linked[name] = (size, sha256)` adds to that redirect what the hub says there of an LFS file:
    `X-Linked-Size: <size>` and `X-Linked-Etag: "<sha256>"`.

    `faults[name]` lists faults for the next requests of that file, used up one per request:
    "drop" (send half the body, then hang up), "cut" (send half the body without a
    Content-Length, then close: it looks complete), "503" or any other status (answer it),
    "slow" (4 KB per 50 ms), "corrupt" (flip the first byte), "whole" (ignore the Range header),
    "endless" (no Content-Length, and bytes that never end: 64 KB chunks until the client hangs
    up, for at most ENDLESS_SECONDS), "trickle" (its Content-Length, then one byte per
    TRICKLE_PACE s, for at most ENDLESS_SECONDS). `/loop/<path>` redirects to itself, for ever.
    `requests` logs (path, Range header) for every request. A context manager: it stops on exit."""

    def __init__(self, files, root="/", routes=None, linked=None):
        self.files, self.root, self.routes = dict(files), root, dict(routes or {})
        self.linked = dict(linked or {})
        self.faults = collections.defaultdict(list)
        self.requests = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def paths(self):
        """The paths asked for, in order."""
        return [path for path, _ in self.requests]

    def downloads(self, name):
        """The Range headers of the requests for one file, in order (None: from the start)."""
        return [rng for path, rng in self.requests if path.endswith(name)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range")))
                name = self.path.removeprefix(hub.root)
                route = next((prefix for prefix in hub.routes if self.path.startswith(prefix)), None)
                try:
                    if route is not None:
                        status, headers, body = hub.routes[route](hub, self.path)
                        self.send_response(status)
                        for key, value in headers.items():
                            self.send_header(key, value)
                        self.reply(body)
                    elif self.path.startswith(hub.root) and name in hub.files:
                        self.download(name)
                    elif self.path.startswith("/moved/"):
                        self.redirect(self.path.removeprefix("/moved/"))
                    elif self.path.startswith("/loop/"):
                        self.send_response(302)
                        self.send_header("Location", self.path)
                        self.reply(b"")
                    else:
                        self.send_error(404)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed: that is what some tests do

            def redirect(self, name):
                self.send_response(302)
                self.send_header("Location", hub.root + name)
                if name in hub.linked:
                    size, sha256 = hub.linked[name]
                    self.send_header("X-Linked-Size", str(size))
                    self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.reply(b"")

            def download(self, name):
                fault = hub.faults[name].pop(0) if hub.faults[name] else None
                if fault and fault.isdigit():
                    return self.send_error(int(fault))
                data = hub.files[name]
                if fault == "corrupt":
                    data = bytes([data[0] ^ 1]) + data[1:]
                start = int(re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "bytes=0-")[1])
                if fault == "whole":
                    start = 0
                if start and start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    return self.reply(b"")
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                body = data[start:]
                if fault in ("drop", "cut"):
                    return self.reply(body, cut=len(body) // 2, length=fault == "drop")
                if fault in ("endless", "trickle"):
                    return self.flood(body, fault)
                self.reply(body, pace=0.05 if fault == "slow" else 0)

            def reply(self, body, cut=None, pace=0, length=True):
                """Send `body` (headers first, with its Content-Length if `length`); stop after
                `cut` bytes, or send 4 KB per `pace` s. The connection closes after each answer
                (HTTP/1.0), so without a Content-Length the body ends where the sending stops."""
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if pace:
                    for i in range(0, len(body), 4096):
                        self.wfile.write(body[i:i + 4096])
                        real_sleep(pace)
                else:
                    self.wfile.write(body[:cut])

            def flood(self, body, fault):
                """"endless": 64 KB chunks without a Content-Length; "trickle": `body`, with
                its length, one byte at a time; either until the client hangs up (the write
                fails) or ENDLESS_SECONDS pass."""
                if fault == "trickle":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                deadline = time.monotonic() + ENDLESS_SECONDS
                for i in range(len(body)) if fault == "trickle" else iter(int, 1):
                    if time.monotonic() > deadline:
                        return
                    self.wfile.write(body[i:i + 1] if fault == "trickle" else b"x" * 65536)
                    self.wfile.flush()
                    if fault == "trickle":
                        real_sleep(TRICKLE_PACE)

            def log_message(self, *args):
                pass  # keep pytest's output clean

        return Handler


@pytest.fixture
def local_hub():
    """local_hub(files, root="/", routes=None) starts a LocalHub, stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda *args, **kwargs: stack.enter_context(LocalHub(*args, **kwargs))


@pytest.fixture
def no_backoff(monkeypatch):
    """The download retries' sleeps (plumbing.download's backoff), recorded instead of slept."""
    delays = []
    monkeypatch.setattr(fineweb.time, "sleep", delays.append)
    return delays


@pytest.fixture
def disk_full_at(monkeypatch):
    """disk_full_at(part) makes fineweb.write_shard fail as a full disk does (ENOSPC) for the
    shard whose path holds `part`; it returns the real writer, to put back."""
    real_write_shard = fineweb.write_shard

    def fill_up(part):
        def write_shard_on_a_disk_that_fills_up(path, tokens):
            if part in str(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write_shard(path, tokens)
        monkeypatch.setattr(fineweb, "write_shard", write_shard_on_a_disk_that_fills_up)
        return real_write_shard
    return fill_up


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Running the scripts: as the user runs them, or in this process; and their errors.
# ---------------------------------------------------------------------------------------
def run_script(script, *args, env=None, timeout=600):
    """`python SCRIPT ARGS` in a subprocess from the repository's root, as a user runs it, with
    `env` added to this process's environment: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def run_main(capsys):
    """cli(main, *args) calls a script's main(ARGS) in this process, quicker than a subprocess:
    (exit code, stdout, stderr), whether main returns its code or raises SystemExit."""
    def run(main, *args):
        capsys.readouterr()  # forget what the test printed before
        try:
            code = main(list(map(str, args)))
        except SystemExit as e:
            code = e.code
        return (code or 0, *capsys.readouterr())
    return run


def assert_one_error_line(result, *fragments, alone=True):
    """A user's error, from (exit code, stdout, stderr): exit code 1, no traceback, and one line
    `error: ...` that names what is wrong (holds each of `fragments`) last on stderr. `alone`:
    the only line there; else what a run reported on its way (downloads) may come before it.
    Returns the line."""
    code, _, err = result
    assert code == 1, (code, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert [line for line in lines if line.startswith("error")] == lines[-1:], err
    assert len(lines) == 1 or not alone, err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


# ---------------------------------------------------------------------------------------
# Training runs shared by the test files: Tiny Shakespeare's shards, a tiny recipe, and ways to
# run gpt2.py under torchrun or in the background.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shakespeare_tokens(samples):
    text = (samples / "tinyshakespeare.txt").read_text()
    return np.array([gpt2.EOT] + tiktoken.get_encoding("gpt2").encode_ordinary(text))


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory, shakespeare_tokens):
    """A val shard and a small train shard of Tiny Shakespeare, written with fineweb's writer."""
    folder = tmp_path_factory.mktemp("shakespeare")
    write_shard(folder / "shakespeare_val_000000.bin", shakespeare_tokens[:20_000])
    write_shard(folder / "shakespeare_train_000001.bin", shakespeare_tokens[20_000:28_192])
    return folder


TINY_RUN = ["--model", "tiny", "--n_embd", "64", "--seq_len", "64", "--batch_size", "4",
            "--total_batch_size", "512", "--max_lr", "1e-2", "--warmup_steps", "2",
            "--eval_every", "4", "--val_tokens", "1024", "--hellaswag_every", "0",
            "--num_samples", "0"]


# One run trained once for the session, for the tests that need a run to resume, damage or
# refuse: they copy it (copy_run) rather than train their own. Its checkpoints: steps 2, 4, 6;
# its evaluations: steps 0, 4 and 6.
SHARED_RUN = [*TINY_RUN, "--max_steps", "6", "--checkpoint_every", "2", "--keep_checkpoints", "10"]


@pytest.fixture(scope="session")
def shared_run(shakespeare, tmp_path_factory) -> Path:
    """SHARED_RUN's log_dir, on Tiny Shakespeare. Read it; copy it to change it."""
    log_dir = tmp_path_factory.mktemp("shared_run")
    cli.main(["--data_dir", shakespeare, "--log_dir", log_dir, *SHARED_RUN])
    return log_dir


def copy_run(log_dir, to, until: int | None = None) -> Path:
    """A copy of a run's log_dir at `to`; with `until`, only its checkpoints up to that step
    (as if it had been stopped after it, its log.jsonl whole)."""
    shutil.copytree(log_dir, to)
    for path in checkpoints.Checkpoints(to).list():
        if until is not None and checkpoints.Checkpoints.step_of(path) > until:
            path.unlink()
    return to


def train_losses(log_dir):
    return [e["loss"] for e in training.read_events(log_dir) if "loss" in e]


def torchrun(*args, nproc=2, extra=(), script=ROOT / "gpt2.py", env=None):
    """`torchrun [EXTRA] --nproc_per_node=NPROC SCRIPT ARGS` started, one thread a process, with
    `env` added to this process's environment; its output (stdout and stderr together) to read
    with finish()."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *extra, f"--nproc_per_node={nproc}",
         str(script), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def finish(process):
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return out


def run_in_background(*args, env=None):
    """`python gpt2.py ARGS` started in the background, as a user (or a cluster) runs it."""
    return subprocess.Popen([sys.executable, str(ROOT / "gpt2.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for_step(log_dir, step, process, timeout=300):
    """Wait until the run in `process` has logged training step `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if (log_dir / "log.jsonl").exists() and any(
                e.get("step", -1) >= step and "loss" in e for e in training.read_events(log_dir)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {log_dir}")


TWO_GPUS_OF_TWO_SIZES = """import os, sys
sys.path.insert(0, {root!r})
import cli, gpt2
limit = 4 if os.environ["RANK"] == "0" else 2  # rank 1's GPU holds less
gpt2.micro_batch_fits = lambda model, batch_size, args, runtime: batch_size <= limit
cli.main(sys.argv[1:])
"""


@pytest.fixture(scope="session")
def two_ranks_run(shakespeare, tmp_path_factory):
    """4 steps on 2 gloo processes with dropout and --batch_size auto, where rank 0's "GPU" holds
    micro-batches of up to 4 and rank 1's of 2; then the same run resumed from its step-2
    checkpoint by 2 processes: (the first run's output, its log_dir, the resumed log_dir). The
    first mirrors its log to TensorBoard (tb/ beside the log_dirs) and to wandb (offline)."""
    root = tmp_path_factory.mktemp("two_ranks")
    script = root / "two_gpus_of_two_sizes.py"
    script.write_text(TWO_GPUS_OF_TWO_SIZES.format(root=str(ROOT)))
    full, resumed = root / "full", root / "resumed"
    common = ["--data_dir", shakespeare, *TINY_RUN, "--batch_size", "auto", "--max_steps", "4",
              "--checkpoint_every", "2", "--keep_checkpoints", "5", "--dropout", "0.1",
              "--device", "cpu"]
    out = finish(torchrun(*common, "--log_dir", full, "--tensorboard", root / "tb", "--wandb",
                          "gpt2-tests", script=script, extra=["--standalone"],
                          env={"WANDB_MODE": "offline"}))
    resumed.mkdir()
    shutil.copy(checkpoints.Checkpoints(full).path(2), resumed)
    finish(torchrun(*common, "--log_dir", resumed, "--resume", script=script,
                    extra=["--standalone"]))
    return out, full, resumed


# ---------------------------------------------------------------------------------------
# The oracle for the evaluations: transformers' GPT-2 with random weights, and our copy of it.
# ---------------------------------------------------------------------------------------
def random_transformers_gpt2(n_embd: int, n_positions: int):
    """A random 2-layer GPT2LMHeadModel, fp32, eager attention: the reference implementation.
    Its weights are drawn 10x wider than GPT-2's N(0, 0.02), so that the losses of different
    continuations differ by much more than float rounding."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=n_embd, n_positions=n_positions,
                        initializer_range=0.2, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


def saved_for_us(hf_model, folder: Path) -> Path:
    """hf_model's save_pretrained folder, which `--model FOLDER` and load_pretrained read."""
    hf_model.save_pretrained(folder)
    return folder
