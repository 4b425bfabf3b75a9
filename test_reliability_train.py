"""Training's reliability: resuming with other flags, checkpoint names, signals during an
evaluation, the event log, every OSError as one line, bad weights folders, torchrun's variables."""
import errno
import json
import os
import signal
import socket
import struct

import pytest
import torch

import checkpoints
import cli
import gpt2
import tools
import training
import weights
from conftest import SAMPLES, TINY_RUN, assert_one_error_line, torchrun, wait_for_step


def run_args(data, log_dir, *more):
    return ["--data_dir", data, "--log_dir", log_dir, *TINY_RUN, *more]


def events(log_dir, key):
    return [e["step"] for e in training.read_events(log_dir) if key in e]


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def signal_at_step(monkeypatch, step, *signals):
    """Each of `signals` raised in this process when the run sets step `step`'s learning rate:
    as a user's Ctrl-C or a cluster's SIGTERM arrives mid-step, at a step of the test's choice."""
    real_get_lr = gpt2.get_lr

    def get_lr(s, *args):
        if s == step:
            for name in signals:
                signal.raise_signal(getattr(signal, name))
        return real_get_lr(s, *args)
    monkeypatch.setattr(gpt2, "get_lr", get_lr)


def test_resume_with_max_steps_below_the_checkpoint_step_is_refused_and_keeps_it(
        shakespeare, tmp_path, run_main):
    cli.main(run_args(shakespeare, tmp_path, "--max_steps", "4"))
    before = names(tmp_path)
    result = run_main(cli.main, *run_args(shakespeare, tmp_path, "--max_steps", "2", "--resume"))
    assert_one_error_line(result, "--max_steps 2", "step 4")
    assert names(tmp_path) == before


def test_only_ckpt_and_eight_digits_is_a_checkpoint_and_other_names_are_never_deleted(
        shakespeare, tmp_path, run_main):
    common = run_args(shakespeare, tmp_path, "--checkpoint_every", "2", "--keep_checkpoints", "1")
    cli.main([*common, "--max_steps", "4"])
    mine = {"ckpt_00000001_good.pt": b"a user's", "ckpt_00000008-good.pt": b"another",
            "ckpt_00000009.corrupt.pt": b"moved aside, as the README advises"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    assert [p.name for p in checkpoints.Checkpoints(tmp_path).list()] == ["ckpt_00000004.pt"]
    code, out, err = run_main(cli.main, *common, "--max_steps", "6", "--resume")
    assert code == 0, err
    assert "resumed from" in out and "ckpt_00000004.pt at step 4" in out
    assert [p.name for p in checkpoints.Checkpoints(tmp_path).list()] == ["ckpt_00000006.pt"]
    assert all((tmp_path / name).read_bytes() == data for name, data in mine.items())
    # A folder holding only such files holds no run: a fresh run starts, and deletes none.
    other = tmp_path / "other"
    other.mkdir()
    (other / "ckpt_00000001_good.pt").write_bytes(b"a user's")
    assert run_main(cli.main, *run_args(shakespeare, other, "--max_steps", "1", "--overwrite"))[0] == 0
    assert (other / "ckpt_00000001_good.pt").read_bytes() == b"a user's"


def test_sigterm_under_torchrun_during_an_evaluation_saves_at_once_and_resume_evaluates_there(
        shakespeare, tmp_path, run_main):
    # A long evaluation (124 sequences, one a batch) at step 4, the last; SIGTERM reaches
    # torchrun once step 3 is logged, so the ranks are evaluating: they cut it short and save.
    common = run_args(shakespeare, tmp_path, "--batch_size", "1", "--val_tokens", "8000",
                      "--max_steps", "4", "--device", "cpu")
    run = torchrun(*common, "--eval_every", "4")
    wait_for_step(tmp_path, 3, run)
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=120)
    assert "stopped: SIGTERM after step 4" in out, out
    assert 'gpt2.py", line' not in out, out  # torchrun's own traceback for its signal only
    assert [p.name for p in checkpoints.Checkpoints(tmp_path).list()] == ["ckpt_00000004.pt"]
    assert events(tmp_path, "val_loss") == [0]  # no partial val loss logged at step 4
    code, _, err = run_main(cli.main, *common, "--eval_every", "4", "--resume")
    assert code == 0, err
    assert events(tmp_path, "val_loss") == [0, 4]


def test_a_run_stopped_at_its_final_step_gets_its_final_evaluation_on_resume_and_only_once(
        shakespeare, tmp_path, run_main, monkeypatch):
    common = run_args(shakespeare, tmp_path, "--max_steps", "4")
    signal_at_step(monkeypatch, 3, "SIGTERM")  # during the last training step
    code, _, err = run_main(cli.main, *common)
    assert code == 128 + signal.SIGTERM, err
    assert events(tmp_path, "val_loss") == [0]
    monkeypatch.undo()
    assert run_main(cli.main, *common, "--resume")[0] == 0
    assert events(tmp_path, "val_loss") == [0, 4]
    assert run_main(cli.main, *common, "--resume")[0] == 0  # done: its evaluation is not repeated
    assert events(tmp_path, "val_loss") == [0, 4]


def test_flags_changed_on_resume_are_printed_and_their_param_group_values_are_used(
        shakespeare, tmp_path, run_main):
    cli.main(run_args(shakespeare, tmp_path, "--max_steps", "2"))
    code, out, err = run_main(cli.main, *run_args(shakespeare, tmp_path, "--max_steps", "4",
                                              "--weight_decay", "0.0", "--grad_clip", "0.5",
                                              "--resume"))
    assert code == 0, err
    changed = next(line for line in out.splitlines() if line.startswith("flags changed"))
    for fragment in ("--max_steps 2 -> 4", "--weight_decay 0.1 -> 0.0", "--grad_clip 1.0 -> 0.5"):
        assert fragment in changed, changed
    saved = torch.load(checkpoints.Checkpoints(tmp_path).path(4), weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["weight_decay"] == 0.0  # the flag, not the old
    assert saved["train_config"]["optimizer"]["weight_decay"] == 0.0
    assert saved["changed_on_resume"] == [
        {"step": 2, "max_steps": [2, 4], "weight_decay": [0.1, 0.0], "grad_clip": [1.0, 0.5]}]
    card = tools.model_card(gpt2.load_checkpoint_model(checkpoints.Checkpoints(tmp_path).path(4)), saved,
                           checkpoints.Checkpoints(tmp_path).path(4), "tiny")
    assert '"changed_on_resume"' in card


def test_hellaswag_runs_on_its_own_schedule_when_not_a_multiple_of_eval_every(
        shakespeare, tmp_path):
    cli.main(run_args(shakespeare, tmp_path, "--max_steps", "6", "--hellaswag_every", "3",
                       "--hellaswag_file", SAMPLES / "hellaswag_val_1000.jsonl",
                       "--hellaswag_limit", "4"))
    assert events(tmp_path, "hellaswag") == [0, 3, 6]
    assert events(tmp_path, "val_loss") == [0, 4, 6]


class FullDisk:
    """open() of files whose name ends with `suffix` in append mode fails as a full disk does
    (ENOSPC, without a file name), from the `after`-th such open on."""

    def __init__(self, monkeypatch, suffix, after):
        import builtins
        self.real, self.suffix, self.left = builtins.open, suffix, after
        monkeypatch.setattr(builtins, "open", self)

    def __call__(self, file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(file).endswith(self.suffix) and "a" in mode:
            self.left -= 1
            if self.left < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(file, mode, *args, **kwargs)


def test_a_full_disk_appending_to_log_jsonl_saves_a_checkpoint_then_says_one_line(
        shakespeare, tmp_path, run_main, monkeypatch):
    common = run_args(shakespeare, tmp_path, "--max_steps", "8")
    FullDisk(monkeypatch, "log.jsonl", after=4)  # config, eval 0, steps 0 and 1: then full
    line = assert_one_error_line(run_main(cli.main, *common), "log.jsonl", "No space left on device")
    saved = checkpoints.Checkpoints(tmp_path).list()
    assert saved and str(saved[-1]) in line, line
    monkeypatch.undo()
    assert run_main(cli.main, *common, "--resume")[0] == 0
    # the lines of the steps that could not be written are gone; the run is not
    assert events(tmp_path, "loss") == [0, 1, *range(checkpoints.Checkpoints.step_of(saved[-1]), 8)]


def test_every_oserror_reaching_main_is_one_line_naming_the_path(
        shakespeare, tmp_path, run_main, monkeypatch):
    log_dir = tmp_path / "log"
    cli.main(run_args(shakespeare, log_dir, "--max_steps", "1"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_one_error_line(run_main(cli.main, "plot", "--log_dir", log_dir, "--out", a_file / "x.png"),
                          str(a_file / "x.png"))
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / ".lock").mkdir()  # the lock file cannot be opened
    assert_one_error_line(run_main(cli.main, *run_args(shakespeare, tmp_path / "locked")), ".lock")
    # export on a full disk: one line, and no half-written folder
    real = weights.write_safetensors

    def full(path, tensors):
        real(path, tensors)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(tools, "write_safetensors", full)
    out = tmp_path / "export"
    assert_one_error_line(run_main(cli.main, "export", "--checkpoint",
                              checkpoints.Checkpoints(log_dir).path(1), "--out", out),
                          "model.safetensors", "No space left on device")
    assert not out.exists() and names(tmp_path) == ["a_file", "locked", "log"]


@pytest.fixture
def weights_folder(tmp_path):
    folder = tmp_path / "model"
    tools.save_pretrained(gpt2.GPT(gpt2.GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=8)),
                         folder)
    return folder


def rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8:8 + n]))
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])


def first_tensor(header):
    return header[next(k for k in header if k != "__metadata__")]


@pytest.mark.parametrize("damage", ["a JSON list", "a negative shape", "negative offsets",
                                    "negative n_positions", "a string n_layer"])
def test_a_malformed_weights_folder_is_one_line(weights_folder, run_main, damage):
    weights = weights_folder / "model.safetensors"
    if damage == "a JSON list":
        rewrite_header(weights, lambda h: list(h))
    elif damage == "a negative shape":
        rewrite_header(weights, lambda h: [first_tensor(h).update(
            shape=[-first_tensor(h)["shape"][0], *first_tensor(h)["shape"][1:]],
            data_offsets=first_tensor(h)["data_offsets"][::-1]), h][1])
    elif damage == "negative offsets":
        rewrite_header(weights, lambda h: [first_tensor(h).update(
            data_offsets=[o - 10 ** 6 for o in first_tensor(h)["data_offsets"]]), h][1])
    else:
        config = json.loads((weights_folder / "config.json").read_text())
        key, value = ("n_positions", -1) if "n_positions" in damage else ("n_layer", "2")
        (weights_folder / "config.json").write_text(json.dumps({**config, key: value}))
    result = run_main(cli.main, "sample", "--model", weights_folder, "--max_new_tokens", "1",
                 "--device", "cpu")
    assert_one_error_line(result, str(weights_folder))


@pytest.mark.parametrize("env, fragment", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK 1"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "taken"}, "MASTER_PORT"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "free"}, "2 processes"),
])
def test_torchruns_variables_are_checked_first_and_a_failed_rendezvous_is_one_line(
        shakespeare, tmp_path, run_main, monkeypatch, env, fragment):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if env.get("MASTER_PORT") == "free":
            taken.close()
        for key, value in env.items():
            monkeypatch.setenv(key, str(port) if key == "MASTER_PORT" else value)
        if "MASTER_PORT" in env:
            monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        result = run_main(cli.main, *run_args(shakespeare, tmp_path, "--device", "cpu",
                                          "--dist_timeout", "3"))
    assert_one_error_line(result, fragment)
    assert not torch.distributed.is_initialized()


def test_a_hand_edited_log_keeps_its_well_formed_events_and_warns_about_the_rest(
        shakespeare, tmp_path, run_main):
    common = run_args(shakespeare, tmp_path, "--max_steps", "4")
    cli.main(common)
    log = tmp_path / "log.jsonl"
    lines = log.read_text().splitlines()
    lines[2] = lines[2].replace('"loss": ', '"loss": null, "was": ')  # step 0's loss
    lines.insert(5, '{"step": "3"}')
    lines.insert(6, '[1, 2]')
    log.write_text("\n".join(lines) + "\n")
    code, out, err = run_main(cli.main, "plot", "--log_dir", tmp_path, "--out", tmp_path / "p.png")
    assert code == 0 and "warning" in err and "3 malformed" in err, err
    assert events(tmp_path, "loss") == [1, 2, 3]
    code, out, err = run_main(cli.main, *common[:-1], "6", "--resume")
    assert code == 0 and "warning" in err, err
    assert events(tmp_path, "loss") == [1, 2, 3, 4, 5]


def test_the_first_ctrl_c_says_how_to_quit_and_the_second_quits_with_one_line(
        shakespeare, tmp_path, run_main, monkeypatch):
    common = run_args(shakespeare, tmp_path, "--max_steps", "8")
    signal_at_step(monkeypatch, 1, "SIGINT")
    code, out, err = run_main(cli.main, *common)
    assert code == 128 + signal.SIGINT, err
    assert "stopping after this step; Ctrl-C again to quit without a checkpoint" in out
    assert [p.name for p in checkpoints.Checkpoints(tmp_path).list()] == ["ckpt_00000002.pt"]
    signal_at_step(monkeypatch, 3, "SIGINT", "SIGINT")
    try:
        code, out, err = run_main(cli.main, *common, "--resume")
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped main as a KeyboardInterrupt")
    assert code == 128 + signal.SIGINT and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err
    assert [p.name for p in checkpoints.Checkpoints(tmp_path).list()] == ["ckpt_00000002.pt"]


def test_sample_refuses_more_new_tokens_than_a_sane_cap_with_one_line(weights_folder, run_main):
    assert_one_error_line(run_main(cli.main, "sample", "--model", weights_folder,
                              "--max_new_tokens", "10000000000"), "--max_new_tokens")


def test_a_run_without_data_says_so_before_probing_the_batch_size(tmp_path, run_main):
    (tmp_path / "data").mkdir()
    args = [a for a in run_args(tmp_path / "data", tmp_path / "log") if a != "--batch_size"]
    args.remove("4")
    code, out, err = run_main(cli.main, *args)
    assert_one_error_line((code, out, err), "no token shards")
    assert "--batch_size auto" not in out and "parameters" not in out, out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_shows_one_default_for_each_flag(command):
    parser = cli.COMMANDS[command][0]()
    formatter = parser._get_formatter()
    for action in parser._actions:
        shown = formatter._expand_help(action) if action.help else ""
        assert shown.count("(default") <= 1, (action.option_strings, shown)
