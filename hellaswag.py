"""HellaSwag: the common-sense benchmark on which small GPTs are compared.

HellaSwag (Zellers et al. 2019, https://github.com/rowanz/hellaswag) gives a context and four
possible endings; one of them is what really happened next, three are machine-written
distractors that fooled the models of 2019. Chance is 25%. For a language model the question
becomes: which of the four endings does the model find the least surprising?

    {"ctx": "A man is sitting on a roof. he", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], ...}

How we score it: completion style
---------------------------------
Each example becomes 4 rows of tokens, `ctx + " " + ending` (tiktoken's GPT-2 encoding,
the context and the ending encoded separately), right-padded to a common length, with a mask
that is 1 over the ending's tokens. One forward pass gives the loss of every ending token.
Any model that maps tokens to logits can be scored so. A model of gpt2.py (anything with
`hidden` and `lm_head`) takes a faster road to the same numbers: the 4 rows are packed into
one, the shared context once and the endings after it, with positions and an attention mask
that let each ending see only the context and itself (1.9x fewer tokens through the body),
and the vocabulary logits, the biggest matmul of a small GPT, are computed only at the
positions that predict an ending token, about a third of them.

- `acc`: the prediction is the ending with the lowest *summed* loss (its total log-likelihood).
- `acc_norm`: the lowest *mean* loss over the ending's tokens, which stops long endings being
  punished just for having more tokens to be wrong about.

This is the style of karpathy's build-nanogpt and llm.c `hellaswag.py`. With OpenAI's GPT-2
124M weights on all 10,042 validation examples they report acc 0.2859, acc_norm 0.2955
(2967/10042); GPT-2 XL gets 0.3842 / 0.4893. The GPT-3 paper's 124M model, the line
build-nanogpt plots its training runs against, is quoted at 0.337.

EleutherAI's lm-evaluation-harness scores the same data in *multiple-choice* style and reports
acc 0.2892, acc_norm 0.3114 for GPT-2 124M (XL: 0.4004 / 0.5089). Its differences: it cleans
the text first (drops "[title]"-style WikiHow artifacts, joins `activity_label: ctx_a ctx_b`),
and normalizes the summed log-likelihood by the ending's length in *characters*, not tokens.
The numbers of the two styles are not interchangeable: compare a completion-style score only
with another completion-style score.

How to run it
-------------
    python hellaswag.py --model gpt2                  # OpenAI's weights (downloaded once)
    python hellaswag.py --model path/to/hf_folder     # a transformers save_pretrained folder
    python hellaswag.py --checkpoint log/ckpt_00019073.pt   # a checkpoint of gpt2.py
    python hellaswag.py --model gpt2 --limit 500 --device cpu

(`python hellaswag.py ...` is `python gpt2.py hellaswag ...`: loading a model is gpt2.py's
business, and this module imports only plumbing.py, so that gpt2.py can import it for training.)

During training, gpt2.py calls `evaluate(model, examples, device, rank=..., world_size=...)`
every `--hellaswag_every` steps: each rank scores every world_size-th example and the counts
are summed across ranks, so 8 GPUs get through the 10,042 examples about 8 times sooner.

The data (`hellaswag_{train,val,test}.jsonl`, val is 12 MB) is downloaded once into
`$XDG_CACHE_HOME/gpt2/hellaswag` (default `~/.cache/gpt2/hellaswag`) from `$HELLASWAG_URL`
or `--base_url`, its size and sha256 checked; each run checks that the copy still holds all of
its split's rows, and deletes one that does not, to be downloaded again. `--file PATH` reads a
local copy in the same jsonl format instead, of any length, as it is.

Reading order: data (download, validate), rendering (tokens and mask), scoring, the data flags
of the command line.
"""
import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from plumbing import UserError, cache_dir, download, gpt2_tokenizer

DEFAULT_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"


class Pinned(NamedTuple):
    """What a split's jsonl file holds: its examples, and its bytes and sha256 (None: unchecked)."""
    rows: int
    size: int | None
    sha256: str | None


# rowanz/hellaswag's data files, as they have been since 2019. All three numbers of each come
# from huggingface/datasets' datasets/hellaswag/dataset_infos.json: the rows from its splits'
# "num_examples" (val's 10,042 is also build-nanogpt's count), the bytes and sha256 from its
# "download_checksums" of these same files (github.com/rowanz/hellaswag/raw/master/data/...).
# Val's sha256 is also the one other projects pin for hellaswag_val.jsonl.
SPLIT_FILES = {
    "train": Pinned(rows=39_905, size=47_496_131,
                    sha256="dae5e69249868cb9fe4e23ff925c60b66169564cfb7072d793cd7356a2b69f8d"),
    "val": Pinned(rows=10_042, size=12_246_618,
                  sha256="0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"),
    "test": Pinned(rows=10_003, size=11_752_147,
                   sha256="da082b00543e422b8d25394614d102944586986def4de5cd1bd36d86bcb76261"),
}
SPLITS = tuple(SPLIT_FILES)
N_ENDINGS = 4
# GPT-2's real vocabulary. Models may pad their embedding to 50304 (a multiple of 128, faster
# on GPUs); the padded ids never occur in text, so their logits are left out of the softmax.
N_VOCAB = 50257


# ---------------------------------------------------------------------------------------------
# Data: download once, then read and validate every row.
# ---------------------------------------------------------------------------------------------

def download_split(split: str, base_url: str | None = None) -> Path:
    """Fetch `hellaswag_{split}.jsonl` into the cache unless it is already there (plumbing.py's
    downloader: resumed, retried, its size and sha256 checked against SPLIT_FILES, renamed into
    place only then). In training, rank 0 fetches it before the other ranks look (gpt2.py): one
    download, not one per GPU."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = cache_dir("hellaswag", f"hellaswag_{split}.jsonl")
    base_url = (base_url or os.environ.get("HELLASWAG_URL") or DEFAULT_URL).rstrip("/")
    pinned = SPLIT_FILES[split]
    try:
        return download(f"{base_url}/{path.name}", path, size=pinned.size, sha256=pinned.sha256)
    except UserError as e:
        raise UserError(f"{e} (set --base_url or HELLASWAG_URL, or pass --file PATH)") from None


def check_example(row, where: str) -> dict:
    """Return `row` if it has what scoring needs; otherwise say what is wrong, and where."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    # A context of at least one token: the model needs something to predict an ending from.
    if not isinstance(row.get("ctx"), str) or not row["ctx"].strip():
        raise UserError(f"{where}: 'ctx' must be a non-empty string")
    endings = row.get("endings")
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: 'endings' must be a list of strings")
    if len(endings) != N_ENDINGS:
        raise UserError(f"{where}: {len(endings)} endings, HellaSwag has {N_ENDINGS}")
    if "label" not in row:
        raise UserError(f"{where}: no 'label' (the test split's labels are not public; "
                        "score val or train)")
    label = row["label"]
    # bool is a subclass of int in Python, but `true` is not a valid answer index.
    if type(label) is not int or not 0 <= label < N_ENDINGS:
        raise UserError(f"{where}: 'label' must be an integer 0-{N_ENDINGS - 1}, "
                        f"got {label!r}")
    return row


class Damaged(UserError):
    """A file that is not what a HellaSwag jsonl file must be: not UTF-8 text, a line that is
    not JSON, or (for a split we downloaded) the wrong size or number of rows."""


def parse_lines(path: Path, limit: int | None = None) -> list[tuple[str, object]]:
    """(where, row) for each of the first `limit` (default: all) rows of a jsonl file, decoded
    from JSON but not yet checked; `where` is "PATH: line N"."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json_rows(f, path, limit)
    except UnicodeDecodeError as e:
        raise Damaged(f"{path}: not UTF-8 text ({e.reason}): not a HellaSwag jsonl file") from None
    except OSError as e:  # unreadable: a folder, no permission
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None


def json_rows(lines, name, limit: int | None = None) -> list[tuple[str, object]]:
    """(where, row) for each of the first `limit` non-blank lines, each decoded from JSON;
    `where` is "NAME: line N"."""
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue  # a trailing blank line is not an example
        where = f"{name}: line {lineno}"
        try:
            rows.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise Damaged(f"{where}: not valid JSON ({e.msg})") from None
    return rows


def check_examples(rows: list[tuple[str, object]], path: Path) -> list[dict]:
    """The examples of parse_lines' rows, each checked (check_example)."""
    examples = [check_example(row, where) for where, row in rows]
    if not examples:
        raise UserError(f"{path}: no examples in the file")
    return examples


def read_examples(path: Path, limit: int | None = None) -> list[dict]:
    """Parse a HellaSwag jsonl file (one example per line), validating each line read."""
    return check_examples(parse_lines(path, limit), path)


def read_download(path: Path, split: str, limit: int | None = None) -> list[dict]:
    """The first `limit` examples of our downloaded copy of `split`, once the whole file has
    been checked: whatever the limit, a copy cut short (by a server that sent less and said
    nothing, or by an older version of this code that did not check) must not be scored as
    the split. A bad copy is deleted, so that the next run downloads it again: we wrote it,
    nothing is lost. (A user's own --file goes to read_examples: it is never deleted, and may
    hold any number of rows.)"""
    try:
        rows = split_rows(path, split)
    except Damaged as e:
        path.unlink(missing_ok=True)  # another process may have found it first
        raise UserError(f"{e}; deleted this damaged download: run again to download it anew"
                        ) from None
    return check_examples(rows[:limit], path)


def split_rows(path: Path, split: str) -> list[tuple[str, object]]:
    """parse_lines of the whole file, if it has the size and number of rows of `split`'s."""
    rows, pinned, size = parse_lines(path), SPLIT_FILES[split], path.stat().st_size
    if pinned.size is not None and size != pinned.size:
        raise Damaged(f"{path}: {size:,} bytes, not the {pinned.size:,} of the {split} split's "
                      f"file")
    if len(rows) != pinned.rows:
        raise Damaged(f"{path}: {len(rows):,} examples, not the {pinned.rows:,} of the {split} "
                      f"split")
    return rows


def load_examples(split: str = "val", file: str | os.PathLike | None = None,
                  limit: int | None = None, *, base_url: str | None = None) -> list[dict]:
    """The first `limit` (default: all) examples of `file`, or of the downloaded `split`."""
    if file is not None:
        return read_examples(Path(file), limit)
    return read_download(download_split(split, base_url), split, limit)


# ---------------------------------------------------------------------------------------------
# Rendering: one example becomes 4 rows of tokens and a mask over each row's ending.
# ---------------------------------------------------------------------------------------------

def render_example(example: dict, enc: tiktoken.Encoding | None = None,
                   max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (tokens, mask, label): the 4 candidate completions, right-padded with 0.

    The context and the ending are encoded separately, the ending with a leading space: in
    GPT-2's BPE the space belongs to the word after it (" roof" is one token), so this is how
    the ending's first word would look in running text. If a row would be longer than
    `max_len` (a model's block_size), the context loses tokens from its start; the endings,
    which are what we score, stay whole, after at least one context token to predict the
    first of them from (a model too short for that is an error: the val set's longest ending
    is 73 tokens long).
    """
    enc = enc or gpt2_tokenizer()
    ctx = enc.encode_ordinary(example["ctx"])  # plain text, "<|endoftext|>" too, as all user text
    endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    longest = max(len(end) for end in endings)
    if max_len is not None and longest >= max_len:
        raise UserError(f"an ending of {longest} tokens and one token of its context do not fit "
                        f"the model's block_size of {max_len}: HellaSwag needs a longer one")
    if max_len is not None and len(ctx) + longest > max_len:
        ctx = ctx[len(ctx) + longest - max_len:]
    tokens = torch.zeros((N_ENDINGS, len(ctx) + longest), dtype=torch.long)  # (4, L)
    mask = torch.zeros_like(tokens)  # (4, L), 1 where a token belongs to the ending
    for i, end in enumerate(endings):
        row = ctx + end
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(ctx):len(row)] = 1
    return tokens, mask, example["label"]


def pad_cat(rows: list[torch.Tensor], value: int = 0) -> torch.Tensor:
    """Stack (r_i, L_i) tensors into one (sum of r_i, max L_i) tensor, right-padded with value."""
    width = max(r.size(1) for r in rows)
    return torch.cat([F.pad(r, (0, width - r.size(1)), value=value) for r in rows])


# ---------------------------------------------------------------------------------------------
# Scoring: the loss of each ending, the prediction, and the counts across ranks.
# ---------------------------------------------------------------------------------------------

def fast_path(model: torch.nn.Module) -> bool:
    """Whether `model` is one of gpt2.py's (or quacks like one): `hidden(idx, cache)` for the
    final hidden states, and an `lm_head` module for the logits. Any other model only needs
    to map tokens to logits (or to a tuple whose first item is the logits) at every position.
    """
    return callable(getattr(model, "hidden", None)) and isinstance(
        getattr(model, "lm_head", None), torch.nn.Module)


class Packed(NamedTuple):
    """Several completions that share their first tokens, packed into one row (pack_rows)."""
    tokens: torch.Tensor  # (n,) the shared prefix once, then each completion's own tokens
    pos: torch.Tensor  # (n,) each token's position in its own completion
    part: torch.Tensor  # (n,) 0 for the prefix, k + 1 for the tokens of completion k
    src: torch.Tensor  # (E,) for each scored token, the index of the token that predicts it
    tgt: torch.Tensor  # (E,) the index of each scored token
    slot: torch.Tensor  # (E,) the completion each scored token belongs to


def pack_rows(rows: list[list[int]], shared: int, spans: list[tuple[int, int]]) -> Packed:
    """Completions `rows` whose first `shared` tokens are the same, as one packed row.

    The prefix once, then each row's tokens after it, one row after another. Each token keeps
    its position in its own row, and attention (packed_scores) lets it see the prefix and its
    own row's tokens only: so each token of row k is scored exactly as in a row of its own,
    while the body runs over the prefix once instead of once per row. `spans[k] = (start,
    end)`: row k's tokens start..end-1 are scored, each predicted by the token before it,
    which is the prefix's when it comes before `shared`.
    """
    tokens, pos, part, src, tgt, slot = [rows[0][:shared]], [range(shared)], [[0] * shared], [], [], []
    at = shared  # where the next row's own tokens go in the packed row
    for k, (row, (start, end)) in enumerate(zip(rows, spans)):
        tokens.append(row[shared:])
        pos.append(range(shared, len(row)))
        part.append([k + 1] * (len(row) - shared))
        where = [j if j < shared else at + j - shared for j in range(start - 1, end)]
        src += where[:-1]
        tgt += where[1:]
        slot += [k] * (end - start)
        at += len(row) - shared
    flat = [torch.tensor([t for piece in x for t in piece], dtype=torch.long)
            for x in (tokens, pos, part)]
    return Packed(*flat, *(torch.tensor(x, dtype=torch.long) for x in (src, tgt, slot)))


def pack_example(tokens: torch.Tensor, mask: torch.Tensor) -> Packed:
    """An example's 4 rows (render_example's tokens and mask) as one row for the fast path:
    the context once, then the 4 endings, each ending's tokens scored (pack_rows). 1.9x fewer
    tokens through the body than 4 rows on HellaSwag's val rows, whose contexts are 28 tokens
    and endings 16 on average."""
    n_ctx = int(mask[0].nonzero()[0])  # every ending starts where the context stops
    ends = [n_ctx + int(m.sum()) for m in mask]
    rows = [tokens[i, :end].tolist() for i, end in enumerate(ends)]
    return pack_rows(rows, n_ctx, [(n_ctx, end) for end in ends])


class PackedRows:
    """What gpt2.py's model calls a cache (its chapter 2): the object that tells the model
    where its tokens sit (`positions`) and runs each layer's attention (`attend`). Here the
    positions are the packed rows' own, and a token attends to the tokens before it that are
    of the shared prefix or of its own part: `sees` (B, L, L)."""

    def __init__(self, pos: torch.Tensor, sees: torch.Tensor):
        self.pos, self.mask = pos, sees[:, None]  # (B, L); (B, 1, L, L), one for all heads

    def positions(self, T: int, device) -> torch.Tensor:
        return self.pos

    def attend(self, attn, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def packed_scores(model: torch.nn.Module, packed: list[Packed],
                  device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, hit) of every scored token of a batch of packed rows, in order: (E,) float32
    losses, and (E,) booleans, True where the token is the model's most likely one."""
    tokens = pad_cat([p.tokens[None] for p in packed]).to(device)  # (B, L)
    pos = pad_cat([p.pos[None] for p in packed]).to(device)  # (B, L)
    part = pad_cat([p.part[None] for p in packed], value=-1).to(device)  # (B, L)
    L = tokens.size(1)
    # A token sees the tokens before it that are of the prefix or of its own part. Padding,
    # part -1, sees only itself and the prefix, and no real token sees it.
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()  # (L, L)
    sees = causal & ((part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None]))  # (B, L, L)
    x = model.hidden(tokens, PackedRows(pos, sees))  # (B, L, C)
    rows = torch.cat([torch.full_like(p.src, b) for b, p in enumerate(packed)]).to(device)  # (E,)
    src = torch.cat([p.src for p in packed]).to(device)  # (E,)
    targets = tokens[rows, torch.cat([p.tgt for p in packed]).to(device)]  # (E,)
    # The lm_head (the biggest matmul of a small GPT) runs only at the E scored positions;
    # the padded vocabulary columns are put out of the softmax in place, without a copy.
    logits = model.lm_head(x[rows, src])  # (E, V), V maybe padded
    logits[:, N_VOCAB:] = float("-inf")
    # A stable softmax wants fp32 (not float64: Apple's mps has none).
    losses = F.cross_entropy(logits.float(), targets, reduction="none")  # (E,)
    return losses, logits.argmax(dim=1) == targets


def packed_losses(model: torch.nn.Module, packed: list[Packed],
                  device: str | torch.device) -> torch.Tensor:
    """Summed loss of each ending of a batch of packed examples (the fast path): (B, 4)."""
    losses, _ = packed_scores(model, packed, device)
    which = torch.cat([b * N_ENDINGS + p.slot for b, p in enumerate(packed)]).to(device)  # (E,)
    summed = torch.zeros(len(packed) * N_ENDINGS, dtype=torch.float32, device=device)
    return summed.index_add_(0, which, losses).view(len(packed), N_ENDINGS)


def row_losses(model: torch.nn.Module, rows: list[tuple[torch.Tensor, torch.Tensor]],
               device: str | torch.device) -> torch.Tensor:
    """Summed loss of the ending of each (1, n) row (tokens, mask), any model: (R, 1).

    The plain path: the model's logits at every position, then the ones that predict an ending
    token. Padding cannot leak into the result: attention is causal, so a padded position only
    influences positions after it, and those are not scored.
    """
    tokens = pad_cat([tokens for tokens, _ in rows]).to(device)  # (R, L)
    # Position t predicts token t + 1: the logits at t are scored against the token at t + 1.
    ending = pad_cat([mask for _, mask in rows])[:, 1:].bool().to(device)  # (R, L-1)
    out = model(tokens)
    logits = out[0] if isinstance(out, tuple) else out  # (R, L, V)
    if logits.shape[:2] != tokens.shape:
        raise ValueError(f"the model returned logits of shape {tuple(logits.shape)} for tokens "
                         f"of shape {tuple(tokens.shape)}: every position's logits are needed")
    picked = logits[:, :-1][ending][:, :N_VOCAB].float()  # (E, 50257), padded columns left out
    losses = torch.zeros(ending.shape, dtype=torch.float32, device=device)  # (R, L-1)
    losses[ending] = F.cross_entropy(picked, tokens[:, 1:][ending], reduction="none")
    return losses.sum(dim=1, keepdim=True)


def unpadded_rows(tokens: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """An example's (4, L) tokens and mask as 4 (1, n_i) pairs, each row cut to its own length.

    render_example pads the 4 rows to the longest ending; scored on their own, the rows can be
    batched with rows of their own length instead, and no position is spent on that padding.
    """
    lengths = [int(row.nonzero().max()) + 1 for row in mask]  # the ending ends the row
    return [(tokens[i:i + 1, :n], mask[i:i + 1, :n]) for i, n in enumerate(lengths)]


def autocast(device: str | torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` (bf16, fp16), or no context at all for float32 or None.

    Not autocast(enabled=False): torch < 2.5 raises on that for mps, even though it asks for
    nothing to be done. (gpt2.py's training uses this one too: it lives here because this
    module may not import gpt2.)
    """
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def ending_losses(model: torch.nn.Module, rendered: list[tuple[torch.Tensor, torch.Tensor]],
                  device: str | torch.device, *, autocast_dtype: torch.dtype | None = None,
                  batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """Summed loss of each ending of each rendered (tokens, mask) example: (N, 4), on the CPU.

    Our model packs an example into one row (pack_example), `batch_size` rows a forward pass;
    any other model gets 4 rows per example, `4 * batch_size` a pass. Either way each row is
    scored on its own (attention never crosses rows), so rows of similar length are batched
    together, whichever examples they come from: a batch is nearly all tokens, and the result
    does not depend on the batch size.
    """
    if fast_path(model):
        items = [pack_example(tokens, mask) for tokens, mask in rendered]  # N packed rows
        score, per_pass, endings_per_item = packed_losses, batch_size, N_ENDINGS
    else:
        items = [row for tokens, mask in rendered for row in unpadded_rows(tokens, mask)]  # 4N
        score, per_pass, endings_per_item = row_losses, N_ENDINGS * batch_size, 1
    order = sorted(range(len(items)), key=lambda i: items[i][0].numel())
    losses = torch.empty(len(items), endings_per_item)  # (N, 4) or (4N, 1)
    was_training = model.training
    model.eval()  # no dropout while scoring
    try:
        with torch.no_grad(), tqdm(total=len(rendered) * N_ENDINGS, unit="ending",
                                   disable=not progress) as bar:
            for start in range(0, len(order), per_pass):
                batch = order[start:start + per_pass]
                with autocast(device, autocast_dtype):
                    losses[batch] = score(model, [items[i] for i in batch], device).cpu()
                bar.update(len(batch) * endings_per_item)
    finally:
        model.train(was_training)
    return losses.view(-1, N_ENDINGS)


def check_finite(summed: torch.Tensor, what: str = "HellaSwag endings"):
    """Raise if a loss is NaN or inf: argmin would still pick an ending, so a diverged model
    would get an accuracy (NaN compares false with everything) instead of an error."""
    bad = (~torch.isfinite(summed)).sum().item()
    if bad:
        raise UserError(f"the model's losses are not finite on {bad:,} of {summed.numel():,} "
                        f"{what} (NaN or inf): during training that means the model diverged")


def predict(model: torch.nn.Module, examples: list[dict], device: str | torch.device, *,
            autocast_dtype: torch.dtype | None = None, batch_size: int = 8,
            progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score `examples` with `model`: (labels, pred, pred_norm), each (N,) on the CPU.

    `pred` is the ending with the lowest summed loss, `pred_norm` with the lowest mean loss.
    A loss that is NaN or inf is a UserError (check_finite), not a prediction.
    `model` should be the bare model (not DDP-wrapped), in any vocabulary padding.
    """
    if not examples:  # a rank's share when there are fewer examples than ranks
        nothing = torch.zeros(0, dtype=torch.long)
        return nothing, nothing, nothing
    max_len = getattr(getattr(model, "config", None), "block_size", None)  # crop if limited
    rendered = [render_example(ex, max_len=max_len) for ex in examples]
    labels = torch.tensor([label for _, _, label in rendered], dtype=torch.long)  # (N,)
    summed = ending_losses(model, [(tokens, mask) for tokens, mask, _ in rendered], device,
                           autocast_dtype=autocast_dtype, batch_size=batch_size,
                           progress=progress)  # (N, 4)
    check_finite(summed)
    lengths = torch.stack([mask.sum(dim=1) for _, mask, _ in rendered])  # (N, 4) ending tokens
    return labels, summed.argmin(dim=1), (summed / lengths).argmin(dim=1)


def evaluate(model: torch.nn.Module, examples: list[dict], device: str | torch.device, *,
             rank: int = 0, world_size: int = 1, autocast_dtype: torch.dtype | None = None,
             batch_size: int = 8, progress: bool = False) -> dict:
    """Accuracy of `model` on `examples`: {n, correct, correct_norm, acc, acc_norm}.

    With `world_size` > 1 this rank scores examples i with i % world_size == rank. If
    torch.distributed is initialized the three counts are then summed over all ranks (every
    rank gets the totals, also a rank whose share is empty); if not, the result is this rank's
    share, for the caller to sum. If one rank fails (a UserError), every rank raises one.
    """
    mine = examples[rank::world_size]
    counts = across_ranks(lambda: share_counts(model, mine, device, autocast_dtype=autocast_dtype,
                                               batch_size=batch_size, progress=progress),
                          3, rank, world_size, device, "HellaSwag scoring")
    n, correct, correct_norm = counts
    return {"n": n, "correct": correct, "correct_norm": correct_norm,
            "acc": correct / n if n else float("nan"),
            "acc_norm": correct_norm / n if n else float("nan")}


def across_ranks(count, n: int, rank: int, world_size: int, device: str | torch.device,
                 what: str) -> list[int]:
    """The n counts `count()` returns on this rank, summed over all ranks if torch.distributed
    is initialized and world_size > 1 (every rank gets the totals); else this rank's own. If
    one rank fails (a UserError), every rank raises one: its own error, or one naming it."""
    together = world_size > 1 and dist.is_available() and dist.is_initialized()
    error = None
    try:
        counts = count()
    except UserError as e:
        if not together:
            raise
        # The other ranks wait for this one in the all_reduce: it must get there to tell them.
        counts, error = [0] * n, e
    if together:
        counts, failed = sum_over_ranks(counts, error is not None, rank, world_size, device)
        if error:
            raise error
        if failed:
            raise UserError(f"{what} failed on rank(s) {', '.join(map(str, failed))} "
                            f"(their own error line says why)")
    return counts


def share_counts(model: torch.nn.Module, mine: list[dict], device: str | torch.device,
                 **predict_kwargs) -> list[int]:
    """[examples, correct, correct_norm] of `predict` on this rank's examples."""
    labels, pred, pred_norm = predict(model, mine, device, **predict_kwargs)
    return [len(mine), (pred == labels).sum().item(), (pred_norm == labels).sum().item()]


def sum_over_ranks(counts: list[int], failed: bool, rank: int, world_size: int,
                   device: str | torch.device) -> tuple[list[int], list[int]]:
    """(the counts summed over all ranks, the ranks that failed), in one all_reduce that every
    rank joins, failed or not."""
    flags = [int(failed and r == rank) for r in range(world_size)]  # 1 at this rank if it failed
    total = torch.tensor(counts + flags, dtype=torch.long, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # int64 SUM works on gloo and nccl
    total = total.tolist()
    return total[:len(counts)], [r for r, flag in enumerate(total[len(counts):]) if flag]


def examples_per_second(model: torch.nn.Module, examples: list[dict],
                        device: str | torch.device, **predict_kwargs) -> float:
    """How many `examples` per second `predict` scores (for benchmarks such as gpt2.py bench).

    One timed run, no warm-up: a caller wanting a steady figure runs it more than once.
    predict's results end on the CPU, so the device's queued work is done when the clock stops.
    """
    start = time.perf_counter()
    predict(model, examples, device, **predict_kwargs)
    return len(examples) / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Command line: the data flags. The command itself (loading a model, the device) is gpt2.py's
# `hellaswag` command, which adds these flags to its own.
# ---------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_data_flags(parser: argparse.ArgumentParser):
    parser.add_argument("--split", default="val", choices=SPLITS,
                        help="which split to download and score; test has no public labels")
    parser.add_argument("--file", metavar="PATH",
                        help="read examples from this local jsonl file instead of downloading")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="score only the first N examples; none = all 10,042 of val")
    parser.add_argument("--batch_size", type=positive_int, default=8,
                        help="examples per forward pass (4 rows each, or one packed row for "
                             "gpt2.py's models); lower it if memory runs out")
    parser.add_argument("--base_url", default=None,
                        help=f"where to download the jsonl files from; none = $HELLASWAG_URL, "
                             f"else {DEFAULT_URL}")


if __name__ == "__main__":
    import cli  # the script's door to gpt2.py's command; the module itself never imports it
    cli.main(["hellaswag", *sys.argv[1:]])
