"""Muon shared over processes (DDP and --fsdp) and the loss-spike guard (--skip_spikes)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import checkpoints
import cli
import gpt2
import muon
import training
from conftest import TINY_RUN, assert_one_error_line, finish, torchrun, train_losses
from gpt2 import GPT, GPTConfig

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon: torch >= 2.9")


def muon_optimizer(model, split: bool, share: bool):
    return gpt2.configure_optimizer(model, 1e-3, 0.1, dict(
        muon_lr=0.02, momentum=0.95, weight_decay=0.01, split_qkv=split, share=share))


def shared_steps_equal_one_process_bit_for_bit():
    """Run under torchrun: 4 Muon steps on the same gradients, alone in this process, shared
    over the processes (DDP's whole matrices) and on FSDP2's shards, for Q/K/V split and whole:
    the same weights to the bit; and the matrices' owners cover every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=32)
    for split in (True, False):
        models = {}
        for mode in ("alone", "ddp", "fsdp"):
            torch.manual_seed(0)
            models[mode] = GPT(config)
        for block in models["fsdp"].transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(models["fsdp"], mesh=mesh)
        optimizers = {mode: muon_optimizer(m, split, share=mode != "alone") for mode, m in models.items()}
        owners = muon.muon_owners(optimizers["ddp"].muon.param_groups, dist.get_world_size())
        assert set(owners.values()) == set(range(dist.get_world_size()))
        for step in range(4):
            gen = torch.Generator().manual_seed(step)
            grads = {n: torch.randn(p.shape, generator=gen) for n, p in models["alone"].named_parameters()}
            for mode, model in models.items():
                for n, p in model.named_parameters():
                    p.grad = (distribute_tensor(grads[n], p.device_mesh, p.placements)
                              if mode == "fsdp" else grads[n].clone())
                optimizers[mode].step()
        alone = dict(models["alone"].named_parameters())
        matrices = {n for n in alone if n.endswith(gpt2.CONV1D_WEIGHTS)}
        for mode in ("ddp", "fsdp"):
            for n, p in models[mode].named_parameters():
                p = p.full_tensor() if hasattr(p, "full_tensor") else p
                if n in matrices or mode == "ddp":
                    assert torch.equal(p, alone[n]), (mode, split, n)
                else:  # AdamW on DTensors runs another kernel than on plain tensors
                    torch.testing.assert_close(p, alone[n], atol=1e-6, rtol=0)
    print("bit for bit", dist.get_rank(), flush=True)
    dist.destroy_process_group()


def test_muon_with_adamw_is_one_torch_optimizer_whose_groups_stay_its_parts_after_a_load():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    optimizer = muon_optimizer(model, split=True, share=False)
    assert isinstance(optimizer, torch.optim.Optimizer)
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)[1].backward()
    torch.amp.GradScaler("cpu", enabled=False).step(optimizer)  # GradScaler drives it as one
    optimizer.load_state_dict(optimizer.state_dict())  # Muon's and AdamW's groups replaced
    for group in optimizer.param_groups:  # what the training loop sets every step
        group["lr"] = 0.5 * group.get("lr_scale", 1.0)
    assert [g["lr"] for g in optimizer.muon.param_groups] == [10.0, 10.0]
    assert [g["lr"] for g in optimizer.adamw.param_groups] == [0.5, 0.5]
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1)  # a scheduler takes it too
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(1.0)


def test_muon_shared_over_3_processes_is_one_process_step_bit_for_bit_under_ddp_and_fsdp():
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=3", str(HERE / "test_muon.py")], capture_output=True,
                         text=True, cwd=HERE, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.count("bit for bit") == 3, out.stdout + out.stderr


def final_weights(log_dir, step):
    return torch.load(checkpoints.Checkpoints(log_dir).path(step), weights_only=True)["model"]


def test_muon_split_shared_over_2_ddp_processes_ends_with_1_processs_weights(shakespeare, tmp_path):
    # gpt2.py end to end: 512 tokens a step, 2 micro-batches in one process or 1 on each of 2;
    # c_attn's Q, K and V apart (the default), each rank orthogonalizing its share.
    common = ["--data_dir", shakespeare, *TINY_RUN, "--optimizer", "muon", "--max_steps", "4",
              "--device", "cpu"]
    cli.main([*common, "--log_dir", str(tmp_path / "alone")])
    finish(torchrun(*common, "--log_dir", tmp_path / "ddp", extra=["--standalone"]))
    np.testing.assert_allclose(train_losses(tmp_path / "ddp"), train_losses(tmp_path / "alone"),
                               atol=1e-5, rtol=0)
    alone, ddp = final_weights(tmp_path / "alone", 4), final_weights(tmp_path / "ddp", 4)
    for k in alone:  # the gradients' sums run in another order: float32 noise
        torch.testing.assert_close(ddp[k], alone[k], atol=1e-4, rtol=0)


# -- gpt2.py's runs: --fsdp with Muon, its checkpoint resumed three ways -------------------------

# 256 tokens a step: 2 micro-batches of 2 x 64 in one process, 1 on each of 2
MUON_RUN = [*TINY_RUN, "--batch_size", "2", "--total_batch_size", "256", "--optimizer", "muon",
            "--muon_qkv", "whole", "--max_steps", "4", "--checkpoint_every", "2",
            "--keep_checkpoints", "5", "--device", "cpu"]


def test_muon_with_fsdp_on_2_processes_equals_1_process_and_its_checkpoint_resumes_under_fsdp_ddp_and_alone(
        shakespeare, tmp_path):
    common = ["--data_dir", shakespeare, *MUON_RUN]
    cli.main([*common, "--log_dir", str(tmp_path / "alone")])
    fsdp = tmp_path / "fsdp"
    finish(torchrun(*common, "--log_dir", fsdp, "--fsdp", extra=["--standalone"]))
    alone, sharded = final_weights(tmp_path / "alone", 4), final_weights(fsdp, 4)
    assert sharded.keys() == alone.keys()
    for k in alone:  # the gradients' sums run in another order: float32 noise (as AdamW's test)
        torch.testing.assert_close(sharded[k], alone[k], atol=1e-4, rtol=0)
    momentum = torch.load(checkpoints.Checkpoints(fsdp).path(2), weights_only=True)["optimizer"]["muon"]
    assert all(s["momentum_buffer"].shape[0] in (64, 192, 256) for s in momentum["state"].values())
    for mode in ("fsdp", "ddp", "alone"):  # the sharded step-2 checkpoint, resumed three ways
        (tmp_path / "from_fsdp" / mode).mkdir(parents=True)
        shutil.copy(checkpoints.Checkpoints(fsdp).path(2), tmp_path / "from_fsdp" / mode)
    resumed = {mode: tmp_path / "from_fsdp" / mode for mode in ("fsdp", "ddp", "alone")}
    finish(torchrun(*common, "--log_dir", resumed["fsdp"], "--fsdp", "--resume", extra=["--standalone"]))
    finish(torchrun(*common, "--log_dir", resumed["ddp"], "--resume", extra=["--standalone"]))
    cli.main([*common, "--log_dir", str(resumed["alone"]), "--resume"])
    assert train_losses(resumed["fsdp"]) == train_losses(fsdp)[2:]
    assert all(torch.equal(final_weights(resumed["fsdp"], 4)[k], sharded[k]) for k in sharded)
    for mode in ("ddp", "alone"):
        np.testing.assert_allclose(train_losses(resumed[mode]), train_losses(fsdp)[2:], atol=1e-5, rtol=0)
        weights = final_weights(resumed[mode], 4)
        for k in sharded:
            torch.testing.assert_close(weights[k], sharded[k], atol=1e-4, rtol=0)


# -- The loss-spike guard -----------------------------------------------------------------------

SPIKE_RUN = [*TINY_RUN, "--max_steps", "8", "--checkpoint_every", "1", "--keep_checkpoints", "20",
             "--eval_every", "100", "--skip_spikes", "4"]


@pytest.fixture
def spike_at(monkeypatch):
    """Gradient norms 1000 times the true ones at the given steps, as the guard sees them."""
    monkeypatch.setattr(training, "SPIKE_WARMUP", 4)
    check = training.check_finite

    def inject(steps):
        def check_finite(loss, norm, state, args):
            return check(loss, norm * (1000 if state.step in steps else 1), state, args)
        monkeypatch.setattr(training, "check_finite", check_finite)
    return inject


def test_the_spike_guard_skips_an_injected_spike_resumes_with_its_statistics_and_stops_after_k_in_a_row(
        shakespeare, tmp_path, spike_at, run_main):
    spike_at({5})
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    cli.main(["--data_dir", shakespeare, "--log_dir", str(full), *SPIKE_RUN])
    events = [e for e in training.read_events(full) if "loss" in e]
    assert [e["step"] for e in events if "skipped" in e] == [5]
    assert "gradient norm" in events[5]["skipped"] and "standard deviations" in events[5]["skipped"]
    before, after = (torch.load(checkpoints.Checkpoints(full).path(s), weights_only=True) for s in (5, 6))
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert len(after["spikes"]["loss"]) == 5 and after["spikes"]["in_a_row"] == 1  # 5 taken
    resumed.mkdir()
    shutil.copy(checkpoints.Checkpoints(full).path(3), resumed)  # before the spike: the statistics carry it
    cli.main(["--data_dir", shakespeare, "--log_dir", str(resumed), *SPIKE_RUN, "--resume"])
    assert train_losses(resumed) == train_losses(full)[3:]
    a, b = (torch.load(checkpoints.Checkpoints(d).path(8), weights_only=True) for d in (full, resumed))
    assert a["spikes"] == b["spikes"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    spike_at(set(range(5, 8)))
    assert_stops = run_main(cli.main, "--data_dir", shakespeare, "--log_dir", tmp_path / "stops",
                       *SPIKE_RUN, "--checkpoint_every", "100", "--skip_spikes_limit", "2")
    assert_one_error_line(assert_stops, "step 6: 2 steps in a row skipped as spikes (--skip_spikes 4.0)")


if __name__ == "__main__":
    shared_steps_equal_one_process_bit_for_bit()
