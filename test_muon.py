"""Muon shared over processes (DDP and --fsdp) and the loss-spike guard (--skip_spikes)."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import gpt2
from conftest import TINY_RUN, finish, torchrun, train_losses
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
        owners = gpt2.muon_owners(optimizers["ddp"].muon.param_groups, dist.get_world_size())
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
        muon = {n for n in alone if n.endswith(gpt2.CONV1D_WEIGHTS)}
        for mode in ("ddp", "fsdp"):
            for n, p in models[mode].named_parameters():
                p = p.full_tensor() if hasattr(p, "full_tensor") else p
                if n in muon or mode == "ddp":
                    assert torch.equal(p, alone[n]), (mode, split, n)
                else:  # AdamW on DTensors runs another kernel than on plain tensors
                    torch.testing.assert_close(p, alone[n], atol=1e-6, rtol=0)
    print("bit for bit", dist.get_rank(), flush=True)
    dist.destroy_process_group()


def test_muon_shared_over_3_processes_is_one_process_step_bit_for_bit_under_ddp_and_fsdp():
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=3", str(HERE / "test_muon.py")], capture_output=True,
                         text=True, cwd=HERE, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.count("bit for bit") == 3, out.stdout + out.stderr


if __name__ == "__main__":
    shared_steps_equal_one_process_bit_for_bit()
