"""CORE: the score nanochat measures "a model of GPT-2's grade" with, computed as nanochat does.

CORE comes from the DCLM paper (Li et al. 2024, https://arxiv.org/abs/2406.11794): 22 tasks
(HellaSwag 0- and 10-shot, Jeopardy, BigBench QA Wikidata, ARC easy and challenge, COPA,
CommonsenseQA, PIQA, OpenBookQA, LAMBADA, Winograd, Winogrande, BigBench Dyck languages,
AGIEval LSAT-AR, BigBench CS algorithms, operators, repeat-copy-logic and language
identification, SQuAD, CoQA, BoolQ), each scored few-shot. A task's accuracy is *centered* on
its random baseline b (in percent): (acc - b/100) / (1 - b/100), so 0 is chance and 1 perfect;
CORE is the mean of the 22 centered accuracies. karpathy's nanochat reports it for OpenAI's
GPT-2 and for its own runs; this module follows its code (nanochat/core_eval.py and
scripts/base_eval.py) rule for rule:

- The data is nanochat's eval bundle (BUNDLE_URL): `core.yaml` lists the tasks (`icl_tasks`:
  label, dataset_uri, num_fewshot, icl_task_type, continuation_delimiter, default " "),
  `eval_meta_data.csv` gives each task's "Random baseline", `eval_data/<dataset_uri>` its
  examples, one JSON object a line.
- Each task's examples are shuffled with random.Random(1337) (base_eval.py; then cut to
  --max_per_task, as its --max-per-task); example i's shots are
  random.Random(1234 + i).sample(every other example's index, num_fewshot) (core_eval.py):
  the same prompts in every run, process and rank.
- Prompts (core_eval.py's templates, written out here as plain strings): each shot then the
  example, separated by a blank line, and
    multiple_choice  {"query", "choices", "gold"}: query + delimiter + choice, one per choice;
    schema  {"context_options", "continuation", "gold"}: option + delimiter + continuation,
      one per context option;
    language_modeling  {"context", "continuation"}: context.strip() + delimiter + continuation.
  Each is GPT-2's BPE of the text after one <|endoftext|> token (nanochat's BOS).
- Scoring: for multiple_choice the scored tokens are those after the choices' common prefix,
  for schema the choices' common suffix; the prediction is the choice with the lowest *mean*
  loss over them, the first one on a tie. For language_modeling the example counts if every
  continuation token is the model's most likely one (greedy exact match). A row longer than
  the model's block_size keeps its last block_size tokens (nanochat does this for GPT-2).

How it runs here: the choices of an example share their prompt's first tokens, so they are
packed into one row (hellaswag.py's packing: the prefix once, then each choice's own tokens),
and the vocabulary logits are computed only where a scored token is predicted. A row that
must be cropped is scored alone (cropping shifts each row's positions differently). Rows of
similar length are batched, --tokens_per_batch tokens a forward pass.

    python core.py --model gpt2                         # OpenAI's 124M (downloads both)
    python core.py --model log/ckpt_00019073.pt --tasks hellaswag,arc_easy --max_per_task 500
    python core.py --model my-gpt2 --bundle ~/eval_bundle.zip     # offline: a local copy

During training `--core_every N` logs `core` (and each task's centered accuracy, `core_tasks`)
in log.jsonl; each rank scores every world_size-th example of each task and the counts are
summed over the ranks, so any number of processes gives one process's result.
"""
import argparse
import csv
import math
import os
import random
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

import hellaswag
from plumbing import Parser, UserError, cache_dir, download, gpt2_tokenizer, int_at_least

# nanochat's scripts/base_eval.py downloads the bundle from here.
BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# The bundle's sha256 as several public projects that downloaded it pin it (quoted, not
# downloaded here: no network). Its size in bytes is published nowhere we found: None until
# someone fills it in; meanwhile the server's Content-Length is checked instead.
BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
BUNDLE_SIZE = None
TYPES = ("multiple_choice", "schema", "language_modeling")
EOT = 50256  # GPT-2's <|endoftext|>: nanochat's BOS for GPT-2, before every prompt
SHUFFLE_SEED, SHOT_SEED = 1337, 1234  # base_eval.py's shuffle, core_eval.py's shots
TOKENS_PER_BATCH = 16384


class Task(NamedTuple):
    """One task of the bundle, its examples in nanochat's order (shuffled, maybe cut)."""
    label: str
    kind: str  # one of TYPES
    shots: int
    delimiter: str
    baseline: float  # the random baseline, in percent
    examples: list[dict]
    wheres: list[str]  # "FILE: line N" of each example, for error messages


# ---------------------------------------------------------------------------------------------
# The bundle: downloaded once (plumbing.py's downloader), or a local folder or zip.
# ---------------------------------------------------------------------------------------------

def download_bundle() -> Path:
    """eval_bundle.zip in the cache, downloaded once from $CORE_BUNDLE_URL or BUNDLE_URL:
    resumed, retried, checked against BUNDLE_SHA256 (and BUNDLE_SIZE when known) before it is
    renamed into place; a mismatch is deleted with one error line."""
    url = os.environ.get("CORE_BUNDLE_URL") or BUNDLE_URL
    try:
        return Path(download(url, cache_dir("core", "eval_bundle.zip"), size=BUNDLE_SIZE,
                             sha256=BUNDLE_SHA256))
    except UserError as e:
        raise UserError(f"{e} (set CORE_BUNDLE_URL, or pass --bundle PATH)") from None


class Bundle:
    """The bundle's files by their name in it ("core.yaml", "eval_data/..."), from a folder
    (the bundle's own, or one holding `eval_bundle/`) or from the zip, read in place."""

    def __init__(self, path: Path):
        self.path, self.zip = Path(path), None
        if self.path.is_dir():
            nested = self.path / "eval_bundle"
            self.root = nested if (nested / "core.yaml").is_file() else self.path
        elif self.path.is_file() and zipfile.is_zipfile(self.path):
            self.zip = zipfile.ZipFile(self.path)
            self.prefix = "eval_bundle/" if "eval_bundle/core.yaml" in self.zip.namelist() else ""
        elif self.path.exists():
            raise UserError(f"{self.path}: not a folder or a zip file (--bundle takes the eval "
                            f"bundle's folder or eval_bundle.zip)")
        else:
            raise UserError(f"{self.path}: no such file or folder")

    def where(self, name: str) -> str:
        return str(self.root / name) if self.zip is None else f"{self.path}: {self.prefix}{name}"

    def text(self, name: str) -> str:
        try:
            if self.zip is None:
                return (self.root / name).read_bytes().decode("utf-8")
            return self.zip.read(self.prefix + name).decode("utf-8")
        except (FileNotFoundError, KeyError, IsADirectoryError):
            raise UserError(f"{self.where(name)}: no such file in the bundle") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{self.where(name)}: not UTF-8 text ({e.reason})") from None
        except (OSError, zipfile.BadZipFile) as e:  # a damaged zip member: a bad CRC
            raise UserError(f"{self.where(name)}: cannot read it ({e})") from None


def read_config(bundle: Bundle) -> list[dict]:
    """core.yaml's icl_tasks, each checked: label, dataset_uri, kind, shots, delimiter."""
    try:
        import yaml  # PyYAML: only CORE needs it
    except ImportError:
        raise UserError("CORE reads the bundle's core.yaml with PyYAML: pip install pyyaml") from None
    where = bundle.where("core.yaml")
    try:
        config = yaml.safe_load(bundle.text("core.yaml"))
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    tasks = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise UserError(f"{where}: no 'icl_tasks' list")
    return [check_task(task, f"{where}: icl_tasks[{i}]") for i, task in enumerate(tasks)]


def check_task(task, where: str) -> dict:
    if not isinstance(task, dict):
        raise UserError(f"{where}: expected a mapping, got {type(task).__name__}")
    for key in ("label", "dataset_uri"):
        if not isinstance(task.get(key), str) or not task[key]:
            raise UserError(f"{where}: '{key}' must be a non-empty string")
    if task.get("icl_task_type") not in TYPES:
        raise UserError(f"{where}: 'icl_task_type' must be one of {', '.join(TYPES)}, got "
                        f"{task.get('icl_task_type')!r}")
    shots = task.get("num_fewshot")
    shots = shots[0] if isinstance(shots, list) and shots else shots  # nanochat: num_fewshot[0]
    if type(shots) is not int or shots < 0:
        raise UserError(f"{where}: 'num_fewshot' must be a whole number >= 0 (or a list of "
                        f"them), got {task.get('num_fewshot')!r}")
    delimiter = task.get("continuation_delimiter", " ")
    if not isinstance(delimiter, str):
        raise UserError(f"{where}: 'continuation_delimiter' must be a string")
    return dict(label=task["label"], uri=task["dataset_uri"], kind=task["icl_task_type"],
                shots=shots, delimiter=delimiter)


def read_baselines(bundle: Bundle) -> dict[str, float]:
    """eval_meta_data.csv's "Random baseline" (percent) of each "Eval Task"."""
    where = bundle.where("eval_meta_data.csv")
    rows = csv.DictReader(bundle.text("eval_meta_data.csv").splitlines())
    if not {"Eval Task", "Random baseline"} <= set(rows.fieldnames or ()):
        raise UserError(f"{where}: no 'Eval Task' and 'Random baseline' columns")
    baselines = {}
    for line, row in enumerate(rows, start=2):
        try:
            baselines[row["Eval Task"]] = float(row["Random baseline"])
        except (TypeError, ValueError):
            raise UserError(f"{where}: line {line}: 'Random baseline' {row['Random baseline']!r} "
                            f"is not a number") from None
        if not 0 <= baselines[row["Eval Task"]] < 100:
            raise UserError(f"{where}: line {line}: 'Random baseline' must be a percent in "
                            f"[0, 100)")
    return baselines


FIELDS = {"multiple_choice": ("query", "choices"), "schema": ("context_options", "continuation"),
          "language_modeling": ("context", "continuation")}


def check_example(row, kind: str, where: str) -> dict:
    """`row` if it holds what a `kind` example needs; otherwise one error naming `where`."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in FIELDS[kind]:
        value = row.get(key)
        if key in ("choices", "context_options"):
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise UserError(f"{where}: '{key}' must be a non-empty list of strings")
        elif not isinstance(value, str):
            raise UserError(f"{where}: '{key}' must be a string")
    if kind == "language_modeling":
        if not row["continuation"]:
            raise UserError(f"{where}: 'continuation' is empty: nothing to score")
        return row
    n = len(row[FIELDS[kind][0] if kind == "schema" else "choices"])
    gold = row.get("gold")
    if type(gold) is not int or not 0 <= gold < n:  # bool is an int in Python, not an answer
        raise UserError(f"{where}: 'gold' must be an integer 0-{n - 1} (the right one of its "
                        f"{n}), got {gold!r}")
    return row


def load_tasks(bundle: str | os.PathLike | None = None, tasks: list[str] | None = None,
               max_per_task: int | None = None) -> list[Task]:
    """The tasks of core.yaml (or those named in `tasks`, in that order), each with every
    example checked, in nanochat's order, cut to the first `max_per_task` if given."""
    bundle = Bundle(Path(bundle) if bundle is not None else download_bundle())
    config, baselines = read_config(bundle), read_baselines(bundle)
    by_label = {task["label"]: task for task in config}
    unknown = [label for label in tasks or () if label not in by_label]
    if unknown:
        raise UserError(f"no task {', '.join(map(repr, unknown))} in {bundle.where('core.yaml')}: "
                        f"it has {', '.join(by_label)}")
    return [load_task(bundle, by_label[label], baselines, max_per_task)
            for label in tasks or by_label]


def load_task(bundle: Bundle, task: dict, baselines: dict, max_per_task: int | None) -> Task:
    name = f"eval_data/{task['uri']}"
    if task["label"] not in baselines:
        raise UserError(f"{bundle.where('eval_meta_data.csv')}: no 'Random baseline' for task "
                        f"{task['label']!r}")
    text = bundle.text(name)
    try:
        rows = hellaswag.json_rows(text.splitlines(), bundle.where(name))
    except hellaswag.Damaged as e:
        raise UserError(str(e)) from None
    pairs = [(check_example(row, task["kind"], where), where) for where, row in rows]
    random.Random(SHUFFLE_SEED).shuffle(pairs)  # base_eval.py shuffles before it cuts
    pairs = pairs[:max_per_task]
    if task["shots"] >= len(pairs):
        raise UserError(f"{bundle.where(name)}: {task['label']} is {task['shots']}-shot, but has "
                        f"{len(pairs)} example(s){' (--max_per_task)' if max_per_task else ''}: "
                        f"each prompt's shots are other examples of the task")
    return Task(task["label"], task["kind"], task["shots"], task["delimiter"],
                baselines[task["label"]], [row for row, _ in pairs], [w for _, w in pairs])


# ---------------------------------------------------------------------------------------------
# Prompts: the shots, the text, the tokens and which of them are scored.
# ---------------------------------------------------------------------------------------------

class Others(Sequence):
    """0..n-1 without i, without building the list: random.sample reads a population only
    through len() and indexing, so it draws from this what it draws from the list nanochat
    builds (in O(shots), not O(n), per example)."""

    def __init__(self, n: int, i: int):
        self.n, self.i = n, i

    def __len__(self):
        return self.n - 1

    def __getitem__(self, j):
        if not 0 <= j < self.n - 1:
            raise IndexError(j)
        return j if j < self.i else j + 1


def shot_indices(task: Task, i: int) -> list[int]:
    """The examples whose answers come before example i in its prompt (core_eval.py's draw)."""
    if task.shots == 0:
        return []
    return random.Random(SHOT_SEED + i).sample(Others(len(task.examples), i), task.shots)


def prompts(task: Task, i: int) -> list[str]:
    """Example i's prompts: one per choice (multiple_choice, schema), or for language_modeling
    the prompt without and with the continuation."""
    shots, item, d = [task.examples[j] for j in shot_indices(task, i)], task.examples[i], task.delimiter
    if task.kind == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.kind == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{option}{d}{item['continuation']}" for option in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    prompt = f"{head}{item['context'].strip()}{d}"
    return [prompt.strip(), prompt + item["continuation"]]  # nanochat strips the first only


def common_length(rows: list[list[int]], reverse: bool = False) -> int:
    """How many tokens all rows share at their start (or, reversed, at their end)."""
    ends = [row[::-1] if reverse else row for row in rows]
    n = min(len(row) for row in ends)
    return next((j for j in range(n) if any(row[j] != ends[0][j] for row in ends)), n)


def spans(task: Task, rows: list[list[int]], where: str) -> tuple[list, list]:
    """(rows, (start, end) of each row's scored tokens), as core_eval.py's batch_sequences_*."""
    if task.kind != "language_modeling":
        if task.kind == "multiple_choice":
            start = common_length(rows)
            scored = [(start, len(row)) for row in rows]
        else:
            suffix = common_length(rows, reverse=True)
            scored = [(len(row) - suffix, len(row)) for row in rows]
        # A choice that is all prefix (another's start) scores no token: its mean is NaN, which
        # list.index(min(...)) below handles as nanochat's does. One with nothing before it
        # (all the rows the same) cannot be scored at all.
        if any(start < 1 for start, _ in scored):
            raise UserError(f"{where}: its choices are all the same")
        return rows, scored
    without, whole = rows
    if not len(without) < len(whole) or whole[:len(without)] != without:
        raise UserError(f"{where}: the prompt's tokens without the continuation are not the start "
                        f"of its tokens with it (nanochat refuses such a row too)")
    return [whole], [(len(without), len(whole))]


def crop(row: list[int], span: tuple[int, int], max_len: int | None, where: str):
    """A row longer than max_len keeps its last max_len tokens, its span shifted with it."""
    cut = len(row) - max_len if max_len is not None and len(row) > max_len else 0
    if span[0] - cut < 1:
        raise UserError(f"{where}: its scored tokens alone do not fit the model's block_size of "
                        f"{max_len}")
    return row[cut:], (span[0] - cut, span[1] - cut)


def pack(task: Task, i: int, tokens: list[list[int]], max_len: int | None) -> list:
    """Example i's packed rows: [(hellaswag.Packed, its first choice)]. One row if no row is
    cropped; else each row alone, since cropping shifts each row's positions its own way."""
    rows, scored = spans(task, tokens, task.wheres[i])
    if max_len is None or max(map(len, rows)) <= max_len:
        return [(hellaswag.pack_rows(rows, common_length(rows), scored), 0)]
    out = []
    for k, (row, span) in enumerate(zip(rows, scored)):
        row, span = crop(row, span, max_len, task.wheres[i])
        out.append((hellaswag.pack_rows([row], len(row), [span]), k))
    return out


# ---------------------------------------------------------------------------------------------
# Scoring: a task's examples, the counts across ranks, the centered accuracies and CORE.
# ---------------------------------------------------------------------------------------------

def batches(items: list, tokens_per_batch: int):
    """Index lists of items (sorted by length) of at most tokens_per_batch padded tokens."""
    order = sorted(range(len(items)), key=lambda j: len(items[j][0].tokens))
    batch, longest = [], 0
    for j in order:
        n = len(items[j][0].tokens)
        if batch and (len(batch) + 1) * max(longest, n) > tokens_per_batch:
            yield batch
            batch, longest = [], 0
        batch.append(j)
        longest = max(longest, n)
    if batch:
        yield batch


def correct(model: torch.nn.Module, task: Task, indices, device: str | torch.device, *,
            autocast_dtype: torch.dtype | None = None, tokens_per_batch: int = TOKENS_PER_BATCH,
            chunk: int = 1024) -> list[bool]:
    """Whether the model gets each of the examples `indices` of `task` right, in order."""
    indices, out = list(indices), []
    for at in range(0, len(indices), chunk):  # a chunk's packed rows in memory at a time
        out += chunk_correct(model, task, indices[at:at + chunk], device, autocast_dtype,
                             tokens_per_batch)
    return out


def chunk_correct(model, task: Task, indices: list[int], device, autocast_dtype,
                  tokens_per_batch: int) -> list[bool]:
    enc = gpt2_tokenizer()
    max_len = getattr(getattr(model, "config", None), "block_size", None)
    texts = [prompts(task, i) for i in indices]
    flat = enc.encode_ordinary_batch([t for ts in texts for t in ts], num_threads=os.cpu_count())
    items, owners, first = [], [], 0  # owners: each choice's first slot in the sums below
    slots = 0
    for i, ts in zip(indices, texts):
        tokens = [[EOT] + row for row in flat[first:first + len(ts)]]
        first += len(ts)
        packed = pack(task, i, tokens, max_len)
        items += [(p, slots + k) for p, k in packed]
        n_choices = 1 if task.kind == "language_modeling" else len(ts)
        owners.append((slots, n_choices))
        slots += n_choices
    sums = torch.zeros(3, slots)  # loss sum, scored tokens, most-likely hits of each choice
    for batch in batches(items, tokens_per_batch):
        with hellaswag.autocast(device, autocast_dtype):
            losses, hits = hellaswag.packed_scores(model, [items[j][0] for j in batch], device)
        which = torch.cat([items[j][0].slot + items[j][1] for j in batch])
        sums.index_add_(1, which, torch.stack([losses, torch.ones_like(losses), hits.float()]).cpu())
    hellaswag.check_finite(sums[0][sums[1] > 0], f"{task.label} choices")
    means, hits, counts = (sums[0] / sums[1]).tolist(), sums[2].tolist(), sums[1].tolist()
    out = []
    for i, (s, n) in zip(indices, owners):
        if task.kind == "language_modeling":
            out.append(hits[s] == counts[s])  # every continuation token the most likely one
        else:
            mine = means[s:s + n]  # the first of equal means, as nanochat's list.index(min)
            out.append(mine.index(min(mine)) == task.examples[i]["gold"])
    return out


def centered(acc: float, baseline: float) -> float:
    """base_eval.py's centering: 0 at the random baseline (a percent), 1 at perfect."""
    return (acc - 0.01 * baseline) / (1.0 - 0.01 * baseline)


def evaluate(model: torch.nn.Module, tasks: list[Task], device: str | torch.device, *,
             rank: int = 0, world_size: int = 1, autocast_dtype: torch.dtype | None = None,
             tokens_per_batch: int = TOKENS_PER_BATCH, progress: bool = False) -> dict:
    """{"core": the mean centered accuracy, "tasks": {label: {n, correct, acc, centered}}}.

    This rank scores examples i with i % world_size == rank of every task; with
    torch.distributed initialized the counts are summed over the ranks (hellaswag.py's
    protocol: every rank gets the totals, and an error on one rank stops them all)."""
    was_training = model.training
    model.eval()

    def count():
        got = []
        for task in tqdm(tasks, unit="task", disable=not progress):
            got.append(sum(correct(model, task, range(rank, len(task.examples), world_size),
                                   device, autocast_dtype=autocast_dtype,
                                   tokens_per_batch=tokens_per_batch)))
        return got

    try:
        with torch.no_grad():
            counts = hellaswag.across_ranks(count, len(tasks), rank, world_size, device,
                                            "CORE scoring")
    finally:
        model.train(was_training)
    return summary(tasks, counts)


def summary(tasks: list[Task], counts: list[int]) -> dict:
    results = {}
    for task, right in zip(tasks, counts):
        n = len(task.examples)
        results[task.label] = dict(n=n, correct=right, acc=right / n,
                                   centered=centered(right / n, task.baseline))
    core = sum(r["centered"] for r in results.values()) / len(results) if results else math.nan
    return {"core": core, "tasks": results}


def examples_per_second(model: torch.nn.Module, tasks: list[Task], device, **kwargs) -> float:
    """How many examples per second `evaluate` scores (gpt2.py bench), one timed run."""
    start = time.perf_counter()
    evaluate(model, tasks, device, **kwargs)
    return sum(len(t.examples) for t in tasks) / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# The command line. Loading a model is the tools' business (tools.py, above gpt2.py): imported
# when the command runs, so that training can import this module.
# ---------------------------------------------------------------------------------------------

def parser():
    import cli  # the command line's layer, the top one: this module itself never imports it
    p = Parser(prog="core.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                    description="Score a model on CORE (DCLM's 22 tasks, as nanochat does): each "
                                "task's accuracy and centered accuracy, then CORE; the last line "
                                "is JSON.")
    p.add_argument("--model", default="gpt2", help="OpenAI weights (gpt2 ... gpt2-xl), a "
                   "save_pretrained folder, or a ckpt_*.pt written by training")
    p.add_argument("--bundle", metavar="PATH", help="the eval bundle's folder or eval_bundle.zip "
                   "(offline); none = download it once into the cache ($CORE_BUNDLE_URL or "
                   "nanochat's)")
    p.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t],
                   help="comma-separated task labels (none = all of core.yaml)")
    p.add_argument("--max_per_task", type=int_at_least(0), default=0,
                   help="score only the first N (shuffled) examples of each task, as nanochat's "
                        "--max-per-task (0 = all)")
    p.add_argument("--tokens_per_batch", type=int_at_least(1), default=TOKENS_PER_BATCH,
                   help="padded tokens per forward pass; lower it if memory runs out")
    cli.add_device_flags(p)
    return p


def main(argv=None):
    import json

    import tools  # the tools' layer, above gpt2.py: loading a model, choosing the device
    try:
        args = parser().parse_args(argv)
        # The data first: a bad bundle should fail before minutes of downloading weights.
        tasks = load_tasks(args.bundle, args.tasks, args.max_per_task or None)
        runtime = tools.tool_runtime(args.device)
        is_checkpoint = Path(args.model).is_file()  # a ckpt_*.pt, else a name or a folder
        source = argparse.Namespace(checkpoint=args.model if is_checkpoint else None,
                                    model=None if is_checkpoint else args.model)
        model = tools.load_model(source, runtime.device)
        start = time.perf_counter()
        result = evaluate(model, tasks, runtime.device, autocast_dtype=runtime.dtype,
                          tokens_per_batch=args.tokens_per_batch, progress=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    seconds = time.perf_counter() - start
    n = sum(len(t.examples) for t in tasks)
    width = max(len(t.label) for t in tasks)
    for task in tasks:
        r = result["tasks"][task.label]
        print(f"{task.label:<{width}}  {task.shots:>2}-shot {task.kind:<17}  acc {r['acc']:.4f}"
              f"  centered {r['centered']:+.4f}  ({r['correct']}/{r['n']})")
    print(f"CORE {result['core']:.4f}  ({len(tasks)} tasks, {n:,} examples in {seconds:.1f} s: "
          f"{n / seconds:.1f} examples/s on {runtime.device})")
    print(json.dumps(dict(result, model=args.model, seconds=seconds, examples_per_s=n / seconds)))


if __name__ == "__main__":
    main()
