"""The plumbing every script shares, with no torch in it: the one-line error, the parser and
its flag types, atomic writes, the cache folder, the tokenizer's loader, locks, and the
downloader that resumes, retries and checks.

fineweb.py, gpt2.py, hellaswag.py and core.py all import it: one copy of each, not four that
drift apart. It imports no torch (so fineweb.py's tokenizer workers stay small and importing it
costs the others nothing) and nothing of this project: every other module sits above it. The
downloader is the one a 28 GB FineWeb-Edu download needs (hours over networks that fail in
every way), so it is the one every download uses: hub weights, HellaSwag, CORE's bundle.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import pathlib
import re
import secrets
import socket
import sys
import threading
import time
import urllib.parse

import requests
import tiktoken
from tqdm import tqdm


class UserError(Exception):
    """Something the user can fix (a bad file, the network, a flag): one line, exit code 1."""


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag as one error line (exit code 1) like every other user error."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def os_error_line(e: OSError) -> str:
    """An OSError that reached a script's main (a full disk, a folder we may not write to, ...),
    as its one error line: the path, and what the system said."""
    where = f"{e.filename} -> {e.filename2}" if getattr(e, "filename2", None) else e.filename
    return f"{where}: {e.strerror or e}" if where else str(e)


@contextlib.contextmanager
def naming(path):
    """Add the file name to an OSError that lacks one: a write() on a full disk raises ENOSPC
    with no name, and the error line must say which file."""
    try:
        yield
    except OSError as e:
        # requests' errors are OSErrors too, but about the network, not this file
        if e.filename is None and not isinstance(e, requests.RequestException):
            e.filename = os.fspath(path)
        raise


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """`with atomic_write(path) as f: f.write(...)`: `f` is a real file (binary; mode="w" for
    UTF-8 text), so torch.save and savefig can write into it too, opened on a new temporary
    file beside `path`, `<path>.<pid>.<8 random hex digits>.tmp`. On a normal exit it is
    flushed, fsynced and renamed onto `path`: a reader sees the old file or the complete new
    one, never a half-written one, even after kill -9. On any exception the temporary file is
    deleted (on a full disk, the space goes back) and the exception goes on, an OSError naming
    `path`."""
    tmp = None
    try:
        with naming(path):
            tmp, fd = create_tmp(path)
            with open(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise


# O_EXCL: the name is made here, so it is never another writer's file, nor a link someone
# planted to make us write elsewhere (O_NOFOLLOW says so again where the OS has it).
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def create_tmp(path):
    """(name, fd) of a new file beside `path`, of a name no other process or call draws: two
    processes saving the same file at once each write their own. The pid in the name tells a
    dead run's leftovers (gpt2.py deletes those of its checkpoints) from a live writer's."""
    while True:
        tmp = f"{os.fspath(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            return tmp, os.open(tmp, NEW_FILE, 0o666)
        except FileExistsError:
            continue  # taken (by a link, say): draw another name


def cache_dir(*parts):
    """Our folder under the user's cache, `$XDG_CACHE_HOME` (default ~/.cache) / gpt2 / parts:
    outside the repository, shared by every checkout. Not created here: download() makes the
    folders it writes into."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2", *parts)


def gpt2_tokenizer():
    """tiktoken's GPT-2 BPE (50,257 tokens). tiktoken downloads its two files on first use and
    caches them (in $TIKTOKEN_CACHE_DIR if set); without them and offline, one line says so."""
    try:
        return tiktoken.get_encoding("gpt2")  # tiktoken keeps it: later calls cost a lookup
    except Exception as e:  # requests' and urllib's network errors, a bad cache folder
        raise UserError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}): tiktoken "
                        f"downloads it once; offline, set TIKTOKEN_CACHE_DIR to a folder "
                        f"holding its cached files") from None


def hub_base():
    """The Hugging Face hub, or the mirror in $HF_ENDPOINT (as huggingface_hub reads it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


TIMEOUT = (10, 60)  # seconds to connect, and to wait for the next bytes of an answer


MAX_TRIES = 8  # 1+2+4+...+64 s: about two minutes of a failing network before giving up


# A read timeout bounds the wait for each byte, so a server sending one a second never trips
# it: a try that moves fewer than STALL_BYTES in STALL_SECONDS (~1 KB/s) is given up, and
# retried. Moving less than that is no progress either, so a line that always trickles ends.
STALL_SECONDS = 60


STALL_BYTES = 1 << 16


UNKNOWN_SIZE_CAP = 1 << 20  # the most a file of unknown size may have (a config.json, a file list)


RETRY_STATUS = {408, 429}  # and every 5xx: the server's trouble, which passes


class TransientError(Exception):
    """A failure that trying again may fix: 5xx, 429, or a download cut short."""


TRANSIENT = (TransientError, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def open_url(session, url, headers=None, passing=(), hint=""):
    """GET `url`, streamed, following redirects. Errors that retrying cannot fix (401, 403,
    404, ...) raise UserError at once, with `hint` added; the server's passing trouble (5xx,
    429) raises TransientError. Statuses in `passing` are returned to the caller."""
    r = session.get(url, headers=headers, stream=True, timeout=TIMEOUT)
    if r.status_code >= 400 and r.status_code not in passing:
        r.close()
        message = f"{url}: HTTP {r.status_code} {r.reason}"
        if r.status_code in RETRY_STATUS or r.status_code >= 500:
            raise TransientError(message)
        raise UserError(message + hint)
    return r


def with_retries(url, attempt, progress=lambda: 0, offline=""):
    """Return attempt(), calling it again after transient failures with exponential backoff,
    each retry one short line. A try that made `progress` (STALL_BYTES more on disk) restarts
    the count: a long download over a flaky line gets there as long as it moves. A host name
    that does not resolve before anything moved is one UserError at once (offline, or a typo in
    the URL), with `offline` saying what to do; so is any other error of `requests`, naming
    the URL."""
    failures, first = 0, progress()
    while True:
        before = progress()
        try:
            return attempt()
        except TRANSIENT as e:
            if progress() == first and unresolved(e):
                host = urllib.parse.urlsplit(url).hostname
                raise UserError(f"cannot reach {host}: offline?{' ' + offline if offline else ''}") from None
            failures = 1 if progress() >= before + STALL_BYTES else failures + 1
            if failures >= MAX_TRIES:
                raise UserError(f"cannot download {url}: {network_problem(e)}; gave up after {MAX_TRIES} "
                                "tries, rerun to resume") from None
            delay = 2 ** (failures - 1)
            tqdm.write(f"{url}: {network_problem(e)}; retrying in {delay} s", file=sys.stderr)
            time.sleep(delay)
        except requests.RequestException as e:  # too many redirects, a bad URL, a certificate, ...
            raise UserError(f"{url}: {network_problem(e)}") from None


def causes(e):
    """`e` and what it wraps, outermost first: requests wraps urllib3's MaxRetryError, whose
    `reason` wraps the socket's error."""
    seen = []
    while isinstance(e, BaseException) and e not in seen:
        seen.append(e)
        e = getattr(e, "reason", None) or e.__cause__ or e.__context__ or (e.args[0] if e.args else None)
    return seen


def unresolved(e):
    return any(isinstance(c, socket.gaierror) for c in causes(e))


def network_problem(e):
    """One short line for a network error: what went wrong at the bottom, not urllib3's nest
    of reprs around it."""
    if isinstance(e, requests.ConnectTimeout):
        return f"no connection within {TIMEOUT[0]} s"
    if isinstance(e, requests.ReadTimeout):
        return f"no answer for {TIMEOUT[1]} s"
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return "the connection broke off mid-answer"
    root = causes(e)[-1]
    if isinstance(root, OSError) and root.strerror:
        return root.strerror
    return str(root).splitlines()[0][:200] if str(root) else type(root).__name__


def download(url, dest, *, size=None, sha256=None, desc=None, max_size=UNKNOWN_SIZE_CAP, offline=""):
    """Download `url` to `dest` (a str or Path, its folders made) and return `dest`; if `dest`
    exists it is returned as it is, without asking the network.

    One process at a time downloads a file: each holds an OS lock on `dest.lock` for the whole
    download, and one that gets the lock after another finished finds `dest` and returns it.
    The bytes go to `dest.part`, continued with an HTTP Range request after a dropped
    connection or by a rerun, with a progress bar. Transient failures (5xx, 429, a dropped
    connection, a timeout) are retried with backoff, giving up after MAX_TRIES tries without
    progress; others (401, 403, 404, ...) raise UserError at once. The finished .part is
    checked against `size` and `sha256`, or where the caller gives none, against what the
    server says: the hub's X-Linked-Size and X-Linked-Etag (an LFS file's size and sha256),
    else its Content-Length. It is deleted with a UserError if it differs, and only then
    renamed: a file at `dest` is always complete and checked. A body that runs past that size,
    or past `max_size` where no size is known, is cut there and refused; a refused download's
    .part is deleted. `offline`: what to do when the host's name does not resolve."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    desc = desc or os.path.basename(os.fspath(dest))
    with exclusive_lock(f"{os.fspath(dest)}.lock", f"{desc}: another process is downloading it; waiting"):
        if not os.path.exists(dest):  # else the process we waited for has just finished it
            fetch(url, dest, Expected(size, sha256), desc, max_size, offline)
    return dest


# A lock on a file, held by one process at a time: flock on Linux and macOS, msvcrt on Windows.
if os.name == "nt":
    import msvcrt

    def try_lock(fd):
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # the file's first byte: where the fd points
            return True
        except OSError:
            return False

    def wait_for_lock(fd):
        while not try_lock(fd):  # LK_LOCK itself gives up after 10 s; a download takes longer
            time.sleep(1)

    def unlock(fd):
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def try_lock(fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def wait_for_lock(fd):
        fcntl.flock(fd, fcntl.LOCK_EX)

    def unlock(fd):
        # Unlocked outright, not by closing fd: a process forked meanwhile holds a copy of it.
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive_lock(path, waiting=None, busy=None):
    """Hold an exclusive OS lock on the file `path` for the block, waiting (after saying
    `waiting`) while another process holds it; or, given `busy`, raising UserError(busy) at
    once instead. The file is deleted on the way out; on POSIX while still held, and a process
    that locked the file just before it went tries again on the new one: so two processes
    never hold two files of one name at once. The OS drops the lock of a process that dies."""
    fd = locked_file(path, waiting, busy)
    try:
        yield
    finally:
        if os.name != "nt":
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        unlock(fd)
        os.close(fd)
        if os.name == "nt":  # Windows deletes no file another process holds open: then it stays
            with contextlib.suppress(OSError):
                os.remove(path)


def locked_file(path, waiting, busy):
    """An fd of `path` (made if need be) that this process holds the lock of."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            if not try_lock(fd):
                if busy:
                    raise UserError(busy)
                tqdm.write(waiting, file=sys.stderr)
                wait_for_lock(fd)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass  # its holder deleted it as it let go: lock the one the next process makes
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def fetch(url, dest, expected, desc, max_size, offline):
    """Download `url` to `dest` through `dest.part`, then check it: download() under its lock."""
    part = f"{os.fspath(dest)}.part"  # one name, so that a rerun continues it: the lock keeps it to one writer
    try:
        with requests.Session() as session, tqdm(total=expected.size, unit="B", unit_scale=True, desc=desc,
                                                  disable=None) as bar:
            with_retries(url, lambda: fetch_rest(session, url, part, expected, bar, max_size),
                         progress=lambda: size_of(part), offline=offline)
    except UserError:  # refused, not cut short: a rerun would not continue it
        with contextlib.suppress(FileNotFoundError):
            os.remove(part)
        raise
    check_download(url, part, expected)
    os.replace(part, dest)
    tqdm.write(f"downloaded {desc} ({size_of(dest):,} bytes)", file=sys.stderr)


def size_of(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


class Expected:
    """What a download must turn out to be: its size and sha256 (None: not known yet), and who
    said so, for the error line. The caller's word comes first; what the server says fills in
    what is not known, and must agree with what is."""

    def __init__(self, size, sha256):
        self.size, self.sha256 = size, sha256.lower() if sha256 else None
        self.origin = {"size": "expected", "sha256": "expected"}

    def learn(self, url, part, key, value, said, origin):
        """Take `value` for `key` if it is not known (from then on, `origin` said it); if it
        is and differs, the server's file is not the one meant, and the .part is junk. `said`:
        how the error line puts the server's word."""
        known = getattr(self, key)
        if value is None or value == known:
            return
        if known is None:
            setattr(self, key, value)
            self.origin[key] = origin
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(part)
        raise UserError(f"{url}: {said}, not the {f'{known:,}' if key == 'size' else known} {self.origin[key]}")


def fetch_rest(session, url, part, expected, bar, max_size):
    """Append to `part` the bytes it is missing, asking only for those (HTTP Range), and learn
    the file's size and sha256 from the answer if `expected` lacks them."""
    have = size_of(part)
    if expected.size is not None and have >= expected.size:
        if have == expected.size:
            return  # complete: check_download says whether it is right
        os.remove(part)  # longer than the file, so not a beginning of it
        have = 0
    # identity: a compressed answer's bytes and Content-Length are not the file's, nor resumable
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    with open_url(session, url, headers, passing={416} if have else ()) as r:
        learn_linked(url, part, expected, r)
        if r.status_code == 416:
            return part_past_the_end(url, part, have, expected, r)
        start, total = body_range(url, r)
        if start != have:
            if start:
                os.remove(part)
                raise TransientError(f"asked for bytes {have:,}- and got {start:,}-; starting again")
            have = 0  # the server ignored Range and sent the whole file: start the .part again
        learn_size(url, part, expected, total)
        bar.reset(total=expected.size)
        bar.update(have)
        limit = (expected.size, "expected") if expected.size is not None else (max_size, "for a file of unknown size")
        with naming(part), open(part, "ab" if have else "wb") as f:
            for chunk in body(url, r, limit, have):
                f.write(chunk)
                bar.update(len(chunk))
    # An answer without a Content-Length ends where the connection closes, cut short or not:
    # only a size known from elsewhere tells.
    if expected.size is not None and size_of(part) < expected.size:
        raise TransientError(f"the connection closed after {size_of(part):,} of {expected.size:,} bytes")


def body(url, r, limit, have=0):
    """The body of the answer `r`, in chunks, as it comes (the progress bar moves with each);
    UserError once the file would pass `limit` = (bytes, why that many), counting the `have`
    already on disk; TransientError if it comes slower than STALL_BYTES per STALL_SECONDS."""
    most, why = limit
    with Stall(r) as stall:
        try:
            # Small chunks: urllib3 drops the chunk in hand when the connection breaks, and
            # the stall watch sees bytes only as chunks arrive.
            for chunk in r.iter_content(chunk_size=1 << 14):
                have += len(chunk)
                if have > most:
                    raise UserError(f"{url}: the server sends more than {'the ' if why == 'expected' else ''}"
                                    f"{most:,} bytes {why}; refused")
                stall.moved += len(chunk)
                yield chunk
        except requests.RequestException:
            if not stall.fired:
                raise
        if stall.fired:
            raise TransientError(f"under {STALL_BYTES:,} bytes in {STALL_SECONDS} s")


class Stall:
    """Watches a streamed answer from a thread: if fewer than STALL_BYTES (counted in `moved`)
    arrive in STALL_SECONDS, it shuts the connection's socket, which ends the read blocked on
    it at once, and sets `fired`."""

    def __init__(self, r):
        self.r, self.moved, self.fired, self.done = r, 0, False, threading.Event()

    def __enter__(self):
        threading.Thread(target=self.watch, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.done.set()

    def watch(self):
        mark, since = 0, time.monotonic()
        while not self.done.wait(min(1.0, STALL_SECONDS / 4)):
            if self.moved - mark >= STALL_BYTES:
                mark, since = self.moved, time.monotonic()
            elif time.monotonic() - since >= STALL_SECONDS:
                self.fired = True
                # the answer's own socket (its connection may have handed it over and let go),
                # wrapped without a copy and let go again: shut down, not closed under the reader
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    sock = socket.socket(fileno=self.r.raw.fileno())
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    finally:
                        sock.detach()
                return


def learn_linked(url, part, expected, r):
    """Learn what the Hugging Face hub says of an LFS file where huggingface_hub reads it: on
    its answer to /resolve/, the redirect to the CDN (so in r.history), X-Linked-Size (the
    size) and X-Linked-Etag (the sha256, quoted as an ETag is). The hub's plain ETag is not
    used: for a file outside LFS it is a git hash, not a sha256."""
    for answer in [*r.history, r]:
        size = answer.headers.get("X-Linked-Size", "").strip()
        sha256 = answer.headers.get("X-Linked-Etag", "").strip().removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9]+", size):
            expected.learn(url, part, "size", int(size), f"the hub announces {int(size):,} bytes (X-Linked-Size)",
                           "the hub announced (X-Linked-Size)")
        if re.fullmatch(r"[0-9a-f]{64}", sha256):
            expected.learn(url, part, "sha256", sha256, f"the hub announces sha256 {sha256} (X-Linked-Etag)",
                           "the hub announced (X-Linked-Etag)")


def body_range(url, r):
    """(where the answer's body starts in the file, the file's size or None if not said)."""
    if r.status_code == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", "").strip())
        if not match:
            raise UserError(f"{url}: a partial answer (206) without a usable Content-Range")
        return int(match[1]), None if match[2] == "*" else int(match[2])
    length = r.headers.get("Content-Length")
    encoded = r.headers.get("Content-Encoding", "identity") != "identity"
    return 0, int(length) if length and not encoded else None


def learn_size(url, part, expected, total):
    """Take the size the server's answer gives (None: it gives none) as the one to check,
    unless one is known: then they must agree."""
    if total is not None:
        expected.learn(url, part, "size", total, f"the server's file has {total:,} bytes",
                       "the server announced")


def part_past_the_end(url, part, have, expected, r):
    """A 416 to `Range: bytes=have-`: the file has no byte at `have`. If the file is `have`
    bytes long the .part is complete (a run stopped between the last byte and the rename);
    else the .part is longer than the file, not a beginning of it: start it again."""
    match = re.fullmatch(r"bytes \*/(\d+)", r.headers.get("Content-Range", "").strip())
    if match and int(match[1]) == have:
        learn_size(url, part, expected, have)
        return
    os.remove(part)
    raise TransientError(f"the server has no bytes from {have:,} on (HTTP 416); starting again")


def file_sha256(path) -> str:
    """A file's sha256, read 16 MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def check_download(url, part, expected):
    """Compare a finished .part with the size and sha256 it must have; delete it if it differs."""
    problem = None
    if expected.size is not None and size_of(part) != expected.size:
        problem = f"got {size_of(part):,} bytes, not the {expected.size:,} {expected.origin['size']}"
    elif expected.sha256:
        digest = file_sha256(part)
        if digest != expected.sha256:
            problem = f"sha256 {digest} differs from the {expected.sha256} {expected.origin['sha256']}"
    if problem:
        os.remove(part)
        raise UserError(f"{url}: {problem}; deleted the download, rerun to fetch it again")


def batch_size_or_auto(text: str):
    return "auto" if text == "auto" else int_at_least(1)(text)


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
