"""Tests for core.py, offline: a small bundle in the real format (core.yaml, eval_meta_data.csv,
eval_data/*.jsonl, zipped under eval_bundle/ as nanochat's is), built here from real text
(HellaSwag and Tiny Shakespeare rows in samples/); transformers as the oracle; a local HTTP
server standing in for nanochat's S3; torchrun on 127.0.0.1 for two ranks.

The model has random weights (transformers.GPT2LMHeadModel from a config, loaded into our GPT
through save_pretrained), drawn wide so that choices' losses differ by far more than rounding.
Its block_size is 128, shorter than some prompts, so that cropping is tested too.
"""
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import tiktoken
import torch
from transformers import GPT2LMHeadModel

import checkpoints
import cli
import core
import gpt2
import tools
import training
from conftest import (TINY_RUN, assert_one_error_line, free_port, random_transformers_gpt2,
                      saved_for_us)

HERE = Path(__file__).resolve().parent
BLOCK = 128
# label: (dataset_uri, num_fewshot, icl_task_type, continuation_delimiter or None, baseline)
TASKS = {
    "hellaswag_2shot": ("language_understanding/hellaswag.jsonl", 2, "multiple_choice", None, 25),
    "arc_like": ("world_knowledge/arc_like.jsonl", 3, "multiple_choice", "\nAnswer: ", 25),
    "winograd_like": ("language_understanding/winograd_like.jsonl", 1, "schema", None, 50),
    "lambada_like": ("language_understanding/lambada_like.jsonl", 0, "language_modeling", None, 0),
    "jeopardy_like": ("world_knowledge/jeopardy_like.jsonl", 2, "language_modeling", "\nAnswer: ", 0),
}
LABELS = list(TASKS)
# core.yaml as nanochat's bundle writes it (a comment and a quoted delimiter included).
CONFIG = "icl_tasks:\n" + "".join(
    f"-\n  label: {label}\n  dataset_uri: {uri}\n  num_fewshot: [{shots}]\n  icl_task_type: {kind}\n"
    + (f"  continuation_delimiter: {json.dumps(delim)} # this separates questions from answers\n"
       if delim else "")
    for label, (uri, shots, kind, delim, _) in TASKS.items())
enc = tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    return random_transformers_gpt2(n_embd=64, n_positions=BLOCK)


@pytest.fixture(scope="module")
def model_folder(hf_model, tmp_path_factory) -> Path:
    return saved_for_us(hf_model, tmp_path_factory.mktemp("random_gpt2"))


@pytest.fixture(scope="module")
def model(model_folder) -> gpt2.GPT:
    return gpt2.load_pretrained(str(model_folder))


def greedy(hf: GPT2LMHeadModel, text: str) -> int:
    with torch.no_grad():
        return int(hf(torch.tensor([[core.EOT, *enc.encode(text)]])).logits[0, -1].argmax())


def task_rows(samples: Path, hf: GPT2LMHeadModel) -> tuple[dict, int]:
    """Each task's rows, and how many rows of lambada_like the model gets right by design."""
    hella = [json.loads(line) for line in (samples / "hellaswag_val_1000.jsonl").open()][:40]
    lines = [line.strip() for line in (samples / "tinyshakespeare.txt").read_text().splitlines()
             if len(line.split()) >= 6][:60]
    nouns = ["trophy", "suitcase", "ball", "window", "table", "lamp", "box", "cup", "rope"]
    rows = {
        "hellaswag_2shot": [dict(query=h["ctx"], choices=h["endings"], gold=h["label"])
                            for h in hella[:13]],
        # Choices that share a first word: the scored tokens start after it.
        "arc_like": [dict(query=f"Question: {h['ctx']}", choices=[f"the {e}" for e in h["endings"]],
                          gold=h["label"]) for h in hella[13:26]],
        "winograd_like": [dict(context_options=[f"The {a} did not fit in the {b} because the {a}",
                                                f"The {a} did not fit in the {b} because the {b}"],
                               continuation=f"was too {w}.", gold=k % 2)
                          for k, (a, b, w) in enumerate(zip(nouns, nouns[3:] + nouns[:3],
                                                            ["big", "small"] * 5))],
        "jeopardy_like": [dict(context=f"Question: {line}", continuation=line.split()[-1])
                          for line in lines[40:51]],
    }
    lambada, right = [], 0
    for k, line in enumerate(lines[:14]):
        word = enc.decode([greedy(hf, line)])
        if re.fullmatch(r" [A-Za-z]+", word) and enc.encode(f"{line}{word}") == [
                *enc.encode(line), *enc.encode(word)]:
            # The greedy word: right; the greedy word and one more token: wrong on that token.
            right += k % 2 == 0
            lambada.append(dict(context=line, continuation=word[1:] + ("" if k % 2 == 0 else "zq")))
        else:
            lambada.append(dict(context=line + " ", continuation="Rome"))  # trailing space: trimmed
    rows["lambada_like"] = lambada
    return rows, right


def write_bundle(folder: Path, rows: dict) -> Path:
    """The bundle's files in `folder`: core.yaml, eval_meta_data.csv (DCLM's columns), and each
    task's rows (a string is written as it is; a task whose rows are None gets no file)."""
    (folder / "eval_data").mkdir(parents=True)
    (folder / "core.yaml").write_text(CONFIG)
    meta = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,"
            "Centered Metric?,Description"]
    meta += [f"{label},test,{kind},{shots},{len(rows[label] or ())},{b},,\"made here, for tests\""
             for label, (_, shots, kind, _, b) in TASKS.items()]
    (folder / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")
    for label, (uri, *_) in TASKS.items():
        if rows[label] is not None:
            path = folder / "eval_data" / uri
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                    for r in rows[label]))
    return folder


def zip_folder(folder: Path, out: Path) -> Path:
    """The folder zipped as nanochat's eval_bundle.zip is: everything under eval_bundle/."""
    with zipfile.ZipFile(out, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, f"eval_bundle/{path.relative_to(folder)}")
    return out


@pytest.fixture(scope="module")
def built(samples, hf_model, tmp_path_factory):
    rows, right = task_rows(samples, hf_model)
    base = tmp_path_factory.mktemp("bundle")
    folder = write_bundle(base / "eval_bundle", rows)
    return dict(rows=rows, right=right, folder=folder,
                zip=zip_folder(folder, base / "eval_bundle.zip"))


@pytest.fixture(scope="module")
def tasks(built) -> list[core.Task]:
    return core.load_tasks(built["zip"])


# -- An oracle written apart from core.py: nanochat's rules on transformers' logits, row by row --

def oracle_prompts(kind: str, delim: str, data: list[dict], i: int, shots: int) -> list[str]:
    picks = random.Random(1234 + i).sample([j for j in range(len(data)) if j != i], shots)
    ex, text = data[i], ""
    for s in (data[j] for j in picks):
        if kind == "multiple_choice":
            text += s["query"] + delim + s["choices"][s["gold"]] + "\n\n"
        elif kind == "schema":
            text += s["context_options"][s["gold"]] + delim + s["continuation"] + "\n\n"
        else:
            text += s["context"].strip() + delim + s["continuation"] + "\n\n"
    if kind == "multiple_choice":
        return [text + ex["query"] + delim + c for c in ex["choices"]]
    if kind == "schema":
        return [text + c + delim + ex["continuation"] for c in ex["context_options"]]
    return [(text + ex["context"].strip() + delim).strip(),
            text + ex["context"].strip() + delim + ex["continuation"]]


def oracle(hf: GPT2LMHeadModel, kind: str, delim: str, shots: int, rows: list[dict]):
    """(each example right or not, in nanochat's order; how many rows were cropped)."""
    data = list(rows)
    random.Random(1337).shuffle(data)
    out, cropped = [], 0
    for i in range(len(data)):
        ids = [[50256, *enc.encode(p)] for p in oracle_prompts(kind, delim, data, i, shots)]
        if kind == "multiple_choice":
            start = len(os.path.commonprefix(ids))
            scored = [(row, start, len(row)) for row in ids]
        elif kind == "schema":
            n = len(os.path.commonprefix([row[::-1] for row in ids]))
            scored = [(row, len(row) - n, len(row)) for row in ids]
        else:
            scored = [(ids[1], len(ids[0]), len(ids[1]))]
        means, hits = [], []
        for row, s, e in scored:
            cut = max(0, len(row) - BLOCK)
            cropped += cut > 0
            row, s, e = row[cut:], s - cut, e - cut
            with torch.no_grad():
                logits = hf(torch.tensor([row])).logits[0]  # (L, V)
            targets = torch.tensor(row[s:e])
            logp = logits[s - 1:e - 1].log_softmax(-1).gather(1, targets[:, None])[:, 0]
            means.append(-logp.mean().item())
            hits.append(bool((logits[s - 1:e - 1].argmax(-1) == targets).all()))
        out.append(hits[0] if kind == "language_modeling"
                   else means.index(min(means)) == data[i]["gold"])
    return out, cropped


KINDS = {label: (kind, delim or " ", shots) for label, (_, shots, kind, delim, _) in TASKS.items()}


@pytest.fixture(scope="module")
def oracle_results(hf_model, built) -> dict:
    return {label: oracle(hf_model, *KINDS[label], built["rows"][label]) for label in LABELS}


@pytest.mark.parametrize("label", LABELS)
def test_each_examples_verdict_equals_an_independent_scorer_on_transformers_logits(
        label, model, tasks, oracle_results):
    task = next(t for t in tasks if t.label == label)
    assert (task.kind, task.delimiter, task.shots) == KINDS[label]
    ours = core.correct(model, task, range(len(task.examples)), "cpu", tokens_per_batch=700)
    assert ours == oracle_results[label][0]


def test_prompts_longer_than_the_block_size_are_cropped_and_still_agree(oracle_results):
    # The agreement above covers cropped rows: there are some, in both multiple-choice tasks.
    assert oracle_results["arc_like"][1] > 0 and oracle_results["hellaswag_2shot"][1] > 0


def test_language_modeling_counts_an_example_only_if_every_token_is_the_greedy_one(
        model, tasks, built):
    task = next(t for t in tasks if t.label == "lambada_like")
    ours = core.correct(model, task, range(len(task.examples)), "cpu")
    assert sum(ours) == built["right"] > 0  # the rows with one more token count as wrong


def test_the_batching_does_not_change_a_verdict(model, tasks, oracle_results):
    task = tasks[0]
    for budget in (1, 100_000):  # one row a pass, all at once
        ours = core.correct(model, task, range(len(task.examples)), "cpu", tokens_per_batch=budget)
        assert ours == oracle_results[task.label][0]


def test_a_choice_inside_another_scores_no_token_and_loses_as_nanochats_nan_does(model):
    # "fish" is all prefix of "fish food": its mean loss is NaN, and min() over [NaN, x] keeps
    # the NaN at index 0 (nanochat's list.index(min(...))), while over [x, NaN] it keeps x.
    rows = [dict(query="The cat ate", choices=["fish", "fish food"], gold=1),
            dict(query="The cat ate", choices=["fish food", "fish"], gold=1)]
    task = core.Task("t", "multiple_choice", 0, " ", 25.0, rows, ["x: line 1", "x: line 2"])
    assert core.correct(model, task, range(2), "cpu") == [False, False]


# -- Prompts --------------------------------------------------------------------------------------

def test_shots_are_drawn_as_random_sample_over_the_list_nanochat_builds():
    for n, k in [(5, 4), (30, 3), (100, 10), (5000, 10), (20321, 10)]:  # both of sample's roads
        for i in (0, 1, n // 2, n - 1):
            want = random.Random(1234 + i).sample([j for j in range(n) if j != i], k)
            task = core.Task("t", "multiple_choice", k, " ", 25.0, [{}] * n, [""] * n)
            assert core.shot_indices(task, i) == want


def test_prompts_are_the_shots_then_the_example_separated_by_blank_lines():
    mc = core.Task("t", "multiple_choice", 1, "\nAnswer: ", 25.0,
                   [dict(query="Q1?", choices=["a", "b"], gold=1),
                    dict(query="Q2?", choices=["c", "d"], gold=0)], ["", ""])
    assert core.prompts(mc, 0) == ["Q2?\nAnswer: c\n\nQ1?\nAnswer: a", "Q2?\nAnswer: c\n\nQ1?\nAnswer: b"]
    schema = core.Task("t", "schema", 1, " ", 50.0,
                       [dict(context_options=["A x", "B x"], continuation="ran.", gold=1),
                        dict(context_options=["C y", "D y"], continuation="sat.", gold=0)], ["", ""])
    assert core.prompts(schema, 1) == ["B x ran.\n\nC y sat.", "B x ran.\n\nD y sat."]
    lm = core.Task("t", "language_modeling", 1, " ", 0.0,
                   [dict(context=" The sky is ", continuation="blue"),
                    dict(context="Grass is\n", continuation="green")], ["", ""])
    # Contexts trimmed; the prompt without the continuation stripped, the delimiter with it.
    assert core.prompts(lm, 0) == ["Grass is green\n\nThe sky is", "Grass is green\n\nThe sky is blue"]


def same(got: list[core.Task], tasks: list[core.Task]) -> bool:
    """The same tasks, but for the file names in their error messages."""
    return [t._replace(wheres=None) for t in got] == [t._replace(wheres=None) for t in tasks]


def test_the_bundle_reads_the_same_from_its_folder_and_its_zip(built, tasks):
    assert same(core.load_tasks(built["folder"]), tasks)
    assert same(core.load_tasks(built["folder"].parent), tasks)  # the folder holding eval_bundle/
    assert [t.label for t in tasks] == LABELS and [t.baseline for t in tasks] == [v[4] for v in TASKS.values()]


WORKER = """
import json, sys
from pathlib import Path
import torch.distributed as dist
import core, gpt2
folder, bundle, out = sys.argv[1:]
dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
tasks = core.load_tasks(bundle)
result = core.evaluate(gpt2.load_pretrained(folder), tasks, "cpu", rank=rank, world_size=world_size)
prompts = {t.label: [core.prompts(t, i) for i in range(len(t.examples))] for t in tasks}
Path(out, f"rank{rank}.json").write_text(json.dumps(dict(result=result, prompts=prompts)))
dist.destroy_process_group()
"""


def test_two_gloo_processes_give_one_processs_core_from_the_same_prompts(
        model, model_folder, built, tasks, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", script, model_folder,
         built["zip"], tmp_path], capture_output=True, text=True, timeout=300, cwd=HERE,
        env={**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "7"})
    assert run.returncode == 0, run.stderr
    alone = core.evaluate(model, tasks, "cpu")
    assert any(len(t.examples) % 2 for t in tasks)  # uneven shares
    here = {t.label: [core.prompts(t, i) for i in range(len(t.examples))] for t in tasks}
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["result"] == json.loads(json.dumps(alone))
        assert got["prompts"] == here  # other processes, another hash seed: the same prompts


# -- The command ---------------------------------------------------------------------------------

def test_the_command_prints_each_task_then_core_and_ends_with_json(
        model, model_folder, built, oracle_results, run_main, tmp_path):
    code, out, err = run_main(core.main, "--model", model_folder, "--bundle", built["zip"],
                         "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    result = json.loads(lines[-1])
    centered = []
    for label, line in zip(LABELS, lines):
        verdicts = oracle_results[label][0]
        acc = sum(verdicts) / len(verdicts)
        b = TASKS[label][4] / 100
        centered.append((acc - b) / (1 - b))
        assert result["tasks"][label]["acc"] == pytest.approx(acc)
        assert line.startswith(label) and f"acc {acc:.4f}" in line
    assert result["core"] == pytest.approx(sum(centered) / len(centered))
    assert lines[len(LABELS)].startswith(f"CORE {result['core']:.4f}")
    # A checkpoint of ours, and a subset of the tasks in the order asked for.
    path = checkpoints.Checkpoints(tmp_path).path(0)
    torch.save(dict(model=model.state_dict(), config=asdict(model.config)), path)
    code, out, err = run_main(core.main, "--model", path, "--bundle", built["folder"], "--tasks",
                         "winograd_like,arc_like", "--device", "cpu")
    assert code == 0, err
    got = json.loads(out.splitlines()[-1])["tasks"]
    assert list(got) == ["winograd_like", "arc_like"]
    assert got["arc_like"] == result["tasks"]["arc_like"]


def bad_bundles(rows: dict) -> dict:
    hella = [dict(r) for r in rows["hellaswag_2shot"]]
    return {
        "missing task file": (dict(rows, arc_like=None), "arc_like.jsonl: no such file"),
        "malformed row": (dict(rows, winograd_like=rows["winograd_like"][:4] + ["{oops"]),
                          "winograd_like.jsonl: line 5: not valid JSON"),
        "label out of range": (dict(rows, hellaswag_2shot=hella[:2] + [dict(hella[2], gold=4)]),
                               "hellaswag.jsonl: line 3: 'gold' must be an integer 0-3"),
        "more shots than examples": (dict(rows, jeopardy_like=rows["jeopardy_like"][:2]),
                                     "jeopardy_like.jsonl: jeopardy_like is 2-shot, but has 2"),
    }


@pytest.mark.parametrize("case", ["missing task file", "malformed row", "label out of range",
                                  "more shots than examples"])
def test_a_bad_bundle_is_one_line_naming_the_file_and_row(case, built, tmp_path, run_main):
    rows, message = bad_bundles(built["rows"])[case]
    folder = write_bundle(tmp_path / "eval_bundle", rows)
    # The bundle is read before the model is loaded: this folder is never looked at.
    result = run_main(core.main, "--bundle", folder, "--model", tmp_path / "no_model")
    assert_one_error_line(result, message)


# -- The download --------------------------------------------------------------------------------

@pytest.fixture
def s3(built, local_hub, monkeypatch, tmp_path):
    """nanochat's S3 on 127.0.0.1, serving the bundle with 256 KB of other bytes in it (enough
    that half of it is written to disk before a dropped connection), pinned as the real one."""
    path = zip_folder(built["folder"], tmp_path / "eval_bundle.zip")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("eval_bundle/openai-community-gpt2.csv", random.Random(0).randbytes(1 << 18))
    data = path.read_bytes()
    hub = local_hub({"eval_bundle.zip": data})
    monkeypatch.setattr(core, "BUNDLE_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(core, "BUNDLE_SIZE", len(data))
    monkeypatch.setenv("CORE_BUNDLE_URL", f"{hub.url}/eval_bundle.zip")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return hub


def test_the_download_resumes_after_a_dropped_connection(s3, tasks, tmp_path, no_backoff):
    s3.faults["eval_bundle.zip"].append("drop")
    assert same(core.load_tasks(), tasks)
    first, resumed = s3.downloads("eval_bundle.zip")
    assert first is None and resumed.startswith("bytes=") and resumed != "bytes=0-"  # the rest
    assert same(core.load_tasks(), tasks) and len(s3.downloads("eval_bundle.zip")) == 2  # cached
    assert [p.name for p in (tmp_path / "cache/gpt2/core").iterdir()] == ["eval_bundle.zip"]


def test_a_download_with_another_sha256_is_one_line_and_nothing_kept(
        s3, monkeypatch, tmp_path, run_main):
    monkeypatch.setattr(core, "BUNDLE_SHA256", "0" * 64)
    result = run_main(core.main, "--model", tmp_path / "no_model")
    assert_one_error_line(result, "eval_bundle.zip", "sha256", "--bundle PATH", alone=False)
    assert list((tmp_path / "cache/gpt2/core").iterdir()) == []


# -- Training and the tools ------------------------------------------------------------------

def test_training_logs_core_beside_hellaswag_and_plot_draws_it(shakespeare, built, tmp_path):
    log_dir = tmp_path / "run"
    cli.main(["--data_dir", shakespeare, *TINY_RUN, "--max_steps", "4", "--log_dir", log_dir,
               "--core_every", "4", "--core_bundle", built["zip"], "--core_max_per_task", "6"])
    events = [e for e in training.read_events(log_dir) if "core" in e]
    assert [e["step"] for e in events] == [0, 4]
    assert set(events[0]["core_tasks"]) == set(LABELS)
    assert all(-1 <= e["core"] <= 1 for e in events)
    cli.main(["plot", "--log_dir", log_dir, "--out", tmp_path / "plot.png"])
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_bench_measures_core_examples_per_second(model):
    runtime = gpt2.Runtime(device=torch.device("cpu"), dtype=torch.float32)
    speeds = tools.core_speed(model, runtime, 11, 2)
    assert len(speeds) == 2 and all(s > 0 for s in speeds)
