"""Tests of `gpt2.py export` and the --tensorboard / --wandb mirrors: our model in the tools
people already use, each checked by that tool itself.

The oracles are not ours: transformers' AutoTokenizer, pipeline and model loaders on the
exported folder, tiktoken's GPT-2 encoding on real text (samples/), the sha256 of OpenAI's
tokenizer files as tiktoken checks them, TensorBoard's own event reader, and the records of
wandb's offline run file decoded with wandb's protobuf classes. Nothing reaches the network:
HF_HUB_OFFLINE, WANDB_MODE=offline.
"""
import hashlib
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import huggingface_hub
import numpy as np
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch
import transformers

import checkpoints
import cli
import gpt2
import tools
import training
from conftest import TINY_RUN, assert_one_error_line, free_port, run_script

HERE = Path(__file__).resolve().parent
HELLASWAG = HERE / "samples" / "hellaswag_val_1000.jsonl"
# OpenAI's encoder.json and vocab.bpe, which the hub serves as gpt2's vocab.json and merges.txt
OPENAI_VOCAB = (1_042_301, "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
OPENAI_MERGES = (456_318, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")

# The run every test here looks at: 3 steps of a tiny model on Tiny Shakespeare, evaluated at
# steps 0, 2 and 3 (val loss, HellaSwag on 8 rows, 2 samples), checkpoints at 2 and 3.
RUN = [*TINY_RUN, "--max_steps", "3", "--eval_every", "2", "--checkpoint_every", "2",
       "--keep_checkpoints", "5", "--hellaswag_every", "2", "--hellaswag_file", HELLASWAG,
       "--hellaswag_limit", "8", "--num_samples", "2", "--sample_tokens", "8"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub: transformers and huggingface_hub read HF_HUB_OFFLINE (the constant in-process,
    the variable in the subprocesses); wandb writes its files and sends nothing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)


@pytest.fixture(scope="module")
def trained(shakespeare, tmp_path_factory):
    """RUN, mirrored to TensorBoard and to wandb (offline): its folder, with log/, tb/, wandb/."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        cli.main(["--data_dir", shakespeare, "--log_dir", root / "log", *RUN,
                   "--tensorboard", root / "tb", "--wandb", "gpt2-tests"])
    return root


@pytest.fixture(scope="module")
def exported(trained):
    """The step-3 checkpoint, exported."""
    cli.main(["export", "--checkpoint", trained / "log/ckpt_00000003.pt", "--out", trained / "hf"])
    return trained / "hf"


@pytest.fixture(scope="module")
def tokenizer(exported):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return transformers.AutoTokenizer.from_pretrained(exported)


# -- 1. The tokenizer -----------------------------------------------------------------------------

def test_vocab_json_and_merges_txt_are_openais_files_byte_for_byte(exported):
    # tiktoken checks the files it downloads against these same sha256s
    published = (Path(tiktoken.__file__).parent.parent / "tiktoken_ext/openai_public.py").read_text()
    for name, (size, sha256) in (("vocab.json", OPENAI_VOCAB), ("merges.txt", OPENAI_MERGES)):
        assert sha256 in published
        data = (exported / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha256), name


def hellaswag_texts():
    """What hellaswag.py encodes: each context, each ending with its leading space; and the
    endings bare too."""
    for line in HELLASWAG.read_text().splitlines():
        row = json.loads(line)
        yield row["ctx"]
        for ending in row["endings"]:
            yield " " + ending
            yield ending


def test_autotokenizer_gives_tiktokens_ids_on_every_hellaswag_row_and_decodes_back(tokenizer):
    enc = tiktoken.get_encoding("gpt2")
    texts = list(hellaswag_texts())
    assert len(texts) == 1000 * 9
    ours = tokenizer(texts)["input_ids"]
    for text, ids in zip(texts, ours):
        assert ids == enc.encode(text), text
        assert tokenizer.decode(ids) == text


def test_autotokenizer_gives_tiktokens_ids_on_every_fineweb_edu_document_and_decodes_back(
        tokenizer, samples):
    enc = tiktoken.get_encoding("gpt2")
    texts = pq.read_table(samples / "fineweb_edu_sample10BT_150.parquet", columns=["text"])["text"].to_pylist()
    assert len(texts) == 150
    for text, ids in zip(texts, tokenizer(texts)["input_ids"]):
        assert ids == enc.encode_ordinary(text)  # fineweb.py's encoding of a document
        assert tokenizer.decode(ids) == text


def test_the_tokenizer_has_gpt2s_special_token_and_the_models_context_as_max_length(tokenizer):
    assert tokenizer.model_max_length == 1024  # the tiny model's block_size
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == gpt2.EOT
    assert len(tokenizer) == gpt2.VOCAB_SIZE
    # this project's rule for user text: the text "<|endoftext|>" is plain text, as gpt2.py's
    # prompts and fineweb.py's documents encode it (split_special_tokens)
    text = "one<|endoftext|>two"
    assert tokenizer(text)["input_ids"] == tiktoken.get_encoding("gpt2").encode_ordinary(text)
    assert gpt2.EOT not in tokenizer(text)["input_ids"]


# -- 2. The model, in transformers ----------------------------------------------------------------

def test_transformers_loads_every_weight_and_every_file_of_the_folder_from_the_folder(exported):
    # Nothing missing, unexpected, resized or made up from defaults: what a warning would flag.
    model, info = transformers.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert type(model).__name__ == "GPT2LMHeadModel" and not any(info.values()), info
    generation = transformers.GenerationConfig.from_pretrained(exported)  # raises without its file
    assert generation.bos_token_id == generation.eos_token_id == gpt2.EOT
    assert (exported / "tokenizer_config.json").is_file() and (exported / "vocab.json").is_file()
    assert transformers.AutoTokenizer.from_pretrained(exported).model_max_length == model.config.n_positions


def sample_text(run_main, *source, prompt="Hello, I'm a language model,", tokens=24):
    """The one continuation `gpt2.py sample --temperature 0` prints."""
    code, out, err = run_main(cli.main, "sample", *source, "--prompt", prompt, "--num_samples", 1,
                         "--max_new_tokens", tokens, "--temperature", 0, "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == lines[-1] == "-" * 80, out
    return "\n".join(lines[1:-1])


def test_transformers_greedy_pipeline_writes_what_gpt2_sample_writes_at_temperature_0(
        trained, exported, run_main):
    prompt = "ROMEO: I shall"
    ours = sample_text(run_main, "--checkpoint", trained / "log/ckpt_00000003.pt", prompt=prompt)
    pipe = transformers.pipeline("text-generation", model=str(exported), do_sample=False)
    theirs = pipe(prompt, max_new_tokens=24, return_tensors=True)[0]["generated_token_ids"]
    assert len(theirs) == len(tiktoken.get_encoding("gpt2").encode(prompt)) + 24  # no early stop
    assert pipe.tokenizer.decode(theirs) == ours
    assert pipe(prompt, max_new_tokens=24)[0]["generated_text"] == ours
    # the very tokens, too
    model = gpt2.load_checkpoint_model(trained / "log/ckpt_00000003.pt").eval()
    prompt_ids = torch.tensor([tiktoken.get_encoding("gpt2").encode(prompt)])
    assert gpt2.generate(model, prompt_ids, 24, temperature=0)[0].tolist() == list(theirs)


def test_gpt2_sample_reads_the_exported_folder_as_it_reads_the_checkpoint(trained, exported, run_main):
    assert (sample_text(run_main, "--model", exported) ==
            sample_text(run_main, "--checkpoint", trained / "log/ckpt_00000003.pt"))


def test_init_from_the_exported_folder_starts_at_the_checkpoints_val_loss(trained, exported,
                                                                           shakespeare, tmp_path):
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path, "--init_from", exported,
               "--seq_len", "64", "--batch_size", "4", "--total_batch_size", "512",
               "--val_tokens", "1024", "--hellaswag_every", "0", "--num_samples", "0",
               "--max_steps", "1", "--eval_every", "1"])  # RUN's evaluation, of step 0
    at_export = next(e["val_loss"] for e in training.read_events(trained / "log")
                     if e["step"] == 3 and "val_loss" in e)
    first = next(e["val_loss"] for e in training.read_events(tmp_path) if "val_loss" in e)
    assert first == pytest.approx(at_export, abs=1e-5)


# -- 3. The rest of the folder --------------------------------------------------------------------

def test_the_folder_holds_the_tokenizer_the_generation_defaults_and_a_model_card(exported):
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "merges.txt", "model.safetensors",
        "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    generation = transformers.GenerationConfig.from_pretrained(exported)
    assert (generation.bos_token_id, generation.eos_token_id) == (gpt2.EOT, gpt2.EOT)
    special = json.loads((exported / "special_tokens_map.json").read_text())
    assert special == dict.fromkeys(("bos_token", "eos_token", "unk_token"), "<|endoftext|>")


def test_the_model_card_says_the_data_the_step_and_the_runs_last_val_loss_and_hellaswag(
        trained, exported, shakespeare):
    card = (exported / "README.md").read_text()
    last = [e for e in training.read_events(trained / "log") if e["step"] == 3 and "val_loss" in e][0]
    assert f"- Validation loss: {last['val_loss']:.4f} at step 3" in card
    assert f"- HellaSwag acc_norm (completion style, the first 8 rows of {HELLASWAG}): " \
           f"{last['hellaswag']:.4f} at step 3" in card
    assert "- Steps: 3 (1,536 tokens)" in card
    assert f"- Data: `{shakespeare}`" in card
    assert "gpt2.py" in card and "ckpt_00000003.pt" in card
    assert card.startswith("---\nlibrary_name: transformers\n")


def test_the_model_card_of_the_step_2_checkpoint_gives_step_2s_figures_not_later_ones(
        trained, tmp_path):
    cli.main(["export", "--checkpoint", trained / "log/ckpt_00000002.pt", "--out", tmp_path])
    step2 = [e for e in training.read_events(trained / "log") if e["step"] == 2 and "val_loss" in e][0]
    assert f"- Validation loss: {step2['val_loss']:.4f} at step 2" in (tmp_path / "README.md").read_text()


def test_a_checkpoint_without_its_log_gets_a_card_that_says_unknown(trained, tmp_path):
    shutil.copy(trained / "log/ckpt_00000003.pt", tmp_path / "ckpt_00000003.pt")
    cli.main(["export", "--checkpoint", tmp_path / "ckpt_00000003.pt", "--out", tmp_path / "hf"])
    card = (tmp_path / "hf/README.md").read_text()
    assert "- Validation loss: unknown (no log.jsonl beside the checkpoint)" in card
    assert "- HellaSwag acc_norm" in card and "): unknown (no log.jsonl" in card
    assert "- Steps: 3 (1,536 tokens)" in card


def test_the_card_names_fineweb_edu_when_fineweb_py_made_the_data(trained, tmp_path):
    saved = checkpoints.Checkpoints.load(trained / "log/ckpt_00000003.pt", for_training=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({
        "params": {"source": {"name": "sample-10BT", "max_files": None}, "shard_size": 100},
        "files": [], "val_tokens": 100, "shards": [], "done": True}))
    saved["train_config"]["logs"]["data_dir"] = str(data)
    card = tools.model_card(gpt2.load_checkpoint_model(trained / "log/ckpt_00000003.pt"), saved,
                           trained / "log/ckpt_00000003.pt", "hf")
    assert f"- Data: `{data}`: FineWeb-Edu sample-10BT, tokenized by fineweb.py" in card
    assert "datasets:\n- HuggingFaceFW/fineweb-edu\n---" in card


def test_export_onto_a_file_is_one_error_line(trained, tmp_path, run_main):
    (tmp_path / "taken").write_text("")
    result = run_main(cli.main, "export", "--checkpoint", trained / "log/ckpt_00000003.pt",
                 "--out", tmp_path / "taken")
    assert_one_error_line(result, "is a file, not a folder")


def test_export_into_a_folder_with_files_it_does_not_write_is_refused_and_leaves_them(trained, tmp_path,
                                                                                    run_main):
    checkpoint = trained / "log/ckpt_00000003.pt"
    assert run_main(cli.main, "export", "--checkpoint", checkpoint, "--out", tmp_path / "hf")[0] == 0
    assert run_main(cli.main, "export", "--checkpoint", checkpoint, "--out", tmp_path / "hf")[0] == 0  # again
    stale = tmp_path / "hf/tokenizer.json"  # an older export's, say: transformers would read it first
    stale.write_text("{}")
    assert_one_error_line(run_main(cli.main, "export", "--checkpoint", checkpoint, "--out", tmp_path / "hf"),
                          "holds files export does not write (tokenizer.json)")
    assert stale.read_text() == "{}"


def test_export_offline_without_tiktokens_files_is_one_line_and_writes_nothing(trained, tmp_path):
    # An empty tokenizer cache, and a proxy nobody listens on: tiktoken's download fails at once.
    dead = f"http://127.0.0.1:{free_port()}"
    offline = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "HTTPS_PROXY": dead,
               "https_proxy": dead, "NO_PROXY": "", "no_proxy": ""}
    result = run_script("gpt2.py", "export", "--checkpoint", trained / "log/ckpt_00000003.pt",
                        "--out", tmp_path / "hf", env=offline, timeout=300)
    assert_one_error_line(result, "GPT-2 tokenizer", "TIKTOKEN_CACHE_DIR")
    assert not (tmp_path / "hf").exists()


# -- 4. TensorBoard and wandb ---------------------------------------------------------------------

def scalars_by_key(events) -> dict[str, list[tuple[int, float]]]:
    """log.jsonl's numbers, as (step, value) per name, in order."""
    out = {}
    for e in events:
        if "config" not in e:
            for k, v in e.items():
                if k != "step" and isinstance(v, (int, float)):
                    out.setdefault(k, []).append((e["step"], v))
    return out


def tensorboard_run(folder):
    """A run's TensorBoard files, read by the accumulator TensorBoard's own server uses (the one
    that also hides text a restart purged), everything kept."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    board = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    board.Reload()
    return board


def tensorboard_scalars(board, tag) -> list[tuple[int, float]]:
    from tensorboard.util.tensor_util import make_ndarray
    return [(e.step, make_ndarray(e.tensor_proto).item()) for e in board.Tensors(tag)]


def tensorboard_text(board, tag) -> list[tuple[int, str]]:
    from tensorboard.util.tensor_util import make_ndarray
    return [(e.step, make_ndarray(e.tensor_proto).item().decode())
            for e in board.Tensors(f"{tag}/text_summary")]


def float32(points) -> list[tuple[int, float]]:
    """TensorBoard keeps float32."""
    return [(step, float(np.float32(v))) for step, v in points]


def unfenced(text: str) -> str:
    assert text.startswith("```\n") and text.endswith("\n```"), text
    return text[4:-4]


def test_tensorboard_holds_log_jsonls_every_number_sample_and_config(trained):
    events = training.read_events(trained / "log")
    board = tensorboard_run(trained / "tb")
    expected = scalars_by_key(events)
    assert {"loss", "lr", "norm", "ms", "tokens_per_s", "val_loss", "hellaswag"} <= set(expected)
    assert {tag for tag in board.Tags()["tensors"] if not tag.endswith("text_summary")} == set(expected)
    for key, points in expected.items():
        assert tensorboard_scalars(board, key) == float32(points), key
    evals = [e for e in events if "samples" in e]
    assert [e["step"] for e in evals] == [0, 2, 3]
    for i in range(2):
        assert [(s, unfenced(t)) for s, t in tensorboard_text(board, f"samples/{i}")] == [
            (e["step"], e["samples"][i]) for e in evals]
    [(step, config)] = tensorboard_text(board, "config")
    assert json.loads(unfenced(config)) == events[0] and "config" in events[0]


def wandb_records(run_file):
    """The records of a wandb run file: LevelDB's log format (32 KB blocks of chunks, each with
    a CRC-32 of its type and data), each record a wandb protobuf Record."""
    from wandb.proto import wandb_internal_pb2
    data, pos, record = Path(run_file).read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's last bytes, too few for a chunk header
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break  # zeros: the end of what was written
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        record += chunk
        if kind in (1, 4):  # FULL or LAST
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed
            record = b""


def wandb_offline_run(root) -> tuple[Path, dict, dict, dict]:
    """The one offline run under root/wandb: its folder, its history by step (merged), its
    config at start, and the config updates after."""
    [folder] = (root / "wandb").glob("offline-run-*")
    history, start, updates = {}, {}, {}
    for r in wandb_records(next(folder.glob("run-*.wandb"))):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            start = {i.key: json.loads(i.value_json) for i in r.run.config.update}
        elif kind == "config":
            updates.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return folder, history, start, updates


def test_wandbs_offline_run_holds_log_jsonls_every_number_sample_and_config(trained):
    events = training.read_events(trained / "log")
    folder, history, start, updates = wandb_offline_run(trained)
    for key, points in scalars_by_key(events).items():
        assert [(step, history[step][key]) for step in sorted(history) if key in history[step]] == points, key
    evals = [e for e in events if "samples" in e]
    for e in evals:
        table = json.loads((folder / "files" / history[e["step"]]["samples/path"]).read_text())
        assert table["columns"] == ["sample"] and table["data"] == [[s] for s in e["samples"]]
    assert start["max_steps"] == 3 and start["wandb"] == "gpt2-tests"  # the run's flags
    assert updates == {k: v for k, v in events[0].items() if k != "step"}  # the config event
    assert (trained / "log/wandb_run_id").read_text() == folder.name.rsplit("-", 1)[1]


def test_a_resumed_run_goes_on_with_the_same_curves_and_the_same_wandb_run(trained, shakespeare,
                                                                          tmp_path, monkeypatch):
    # Interrupted after step 3, resumed from the step-2 checkpoint: log.jsonl forgets what came
    # after it, and the dashboards must show what log.jsonl then holds, each point once.
    for name in ("log.jsonl", "ckpt_00000002.pt", "wandb_run_id"):
        (tmp_path / "log").mkdir(exist_ok=True)
        shutil.copy(trained / "log" / name, tmp_path / "log" / name)
    shutil.copytree(trained / "tb", tmp_path / "tb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli.main(["--data_dir", shakespeare, "--log_dir", tmp_path / "log", *RUN, "--resume",
               "--tensorboard", tmp_path / "tb", "--wandb", "gpt2-tests"])
    events = training.read_events(tmp_path / "log")
    board = tensorboard_run(tmp_path / "tb")
    for key, points in scalars_by_key(events).items():
        assert tensorboard_scalars(board, key) == float32(points), key
    assert [s for s, _ in tensorboard_text(board, "samples/0")] == [0, 2, 3]
    folder, history, _, _ = wandb_offline_run(tmp_path)
    assert folder.name.endswith("-" + (trained / "log/wandb_run_id").read_text())
    assert sorted(history) == [2, 3]  # what this process sent: wandb keeps the rest


@pytest.mark.parametrize("flag, package", [("--tensorboard", "tensorboard"), ("--wandb", "wandb")])
def test_a_missing_dashboard_package_is_one_line_naming_pip_install_and_never_needed_without_its_flag(
        flag, package, shakespeare, tmp_path, run_main, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import wandb / tensorboard: ImportError
    common = ["--data_dir", shakespeare, *TINY_RUN, "--max_steps", "1"]
    result = run_main(cli.main, *common, "--log_dir", tmp_path / "with", flag, tmp_path / "x")
    assert_one_error_line(result, f"{flag} needs the {package} package", f"pip install {package}")
    code, _, err = run_main(cli.main, *common, "--log_dir", tmp_path / "without")
    assert code == 0, err


def test_tensorboard_onto_a_file_is_one_line(shakespeare, tmp_path, run_main):
    (tmp_path / "taken").write_text("")
    result = run_main(cli.main, "--data_dir", shakespeare, "--log_dir", tmp_path / "log", *TINY_RUN,
                 "--max_steps", "1", "--tensorboard", tmp_path / "taken")
    assert_one_error_line(result, f"--tensorboard {tmp_path / 'taken'}: cannot write there")


def test_wandb_online_without_a_login_is_one_line(shakespeare, tmp_path, monkeypatch):
    # A fresh process: wandb reads its environment once per process.
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: never logged in
    result = run_script("gpt2.py", "--data_dir", shakespeare, "--log_dir", tmp_path / "log",
                        *TINY_RUN, "--max_steps", "1", "--wandb", "gpt2-tests", timeout=300)
    assert_one_error_line(result, "--wandb gpt2-tests:", "wandb login", "WANDB_MODE=offline",
                          alone=False)


def test_with_two_processes_only_rank_0_writes_tensorboard_and_wandb(two_ranks_run):
    _, log_dir, _ = two_ranks_run
    assert len(list((log_dir.parent / "tb").iterdir())) == 1  # one events file
    board = tensorboard_run(log_dir.parent / "tb")
    loss = scalars_by_key(training.read_events(log_dir))["loss"]
    assert tensorboard_scalars(board, "loss") == float32(loss)
    assert len(list((log_dir / "wandb").glob("offline-run-*"))) == 1
