"""Muon for the blocks' matrices, AdamW for the rest: chapter 6 of gpt2.py chooses it; here is
how it runs. torch.optim.Muon (torch >= 2.9) does the maths; this file shares its work over the
processes (each orthogonalizes its own matrices and sends the results) and keeps Q, K and V
apart, as three matrices (--muon_qkv split, the default).
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from plumbing import UserError, float_at_least_0, fraction, positive_float
from parallel import torch_version

if TYPE_CHECKING:  # annotations only
    from config import OptimizerConfig


# Muon's work, shared. Newton-Schulz is nearly all of a Muon step's time (five iterations of
# three matmuls a matrix), and every DDP process would compute the same results from the same
# gradients. So each process orthogonalizes its share of the matrices and broadcasts the
# results: the same step, 1/N of the matmuls. nanochat's distributed Muon shards the momentum
# too (a reduce-scatter of the gradients, an all-gather of the new weights); here DDP keeps the
# momentum whole on every process, so that the checkpoint keeps one format and all processes'
# weights the same bits: an owner computes exactly what one process would (the same input, the
# same kernels), and a broadcast copies bits. Under --fsdp each process holds rows of each
# matrix and of its momentum (1/N of it): the owner gathers the update's rows (dist.gather),
# orthogonalizes it whole, and scatters each process its rows back (dist.scatter). Every
# process makes the same collectives in the same order: gathers, then its own matrices'
# Newton-Schulz (the part done in parallel), then one broadcast or scatter a matrix.
#
# Who owns what: a matrix's Newton-Schulz FLOPs, (4 n^2 m + 2 n^3) per iteration for its wide
# (n, m) orientation, k times for k parts (Q, K, V: three of (C, C), not one of (3C, C)),
# dealt greedily, the most expensive first, each to the least loaded process (ties: the lower
# position, the lower rank), so every process computes the same owners from the shapes alone.


MUON_MIN_TORCH = (2, 9)  # torch.optim.Muon


def add_muon_flags(flag):
    """--optimizer muon's own settings, in the recipe's flag group (gpt2.py's chapter 9)."""
    flag("--muon_lr", type=positive_float, default=0.02, help="Muon's peak lr (nanochat's)")
    flag("--muon_momentum", type=fraction, default=0.95, help="Muon's momentum, fixed (torch's default)")
    flag("--muon_weight_decay", type=float_at_least_0, default=0.0, help="Muon's decoupled decay")
    flag("--muon_qkv", choices=["split", "whole"], default="split", help="orthogonalize c_attn's "
         "Q, K, V apart (modded-nanogpt's; lower val loss on the README's recipe) or as one matrix")


def muon_settings(o: OptimizerConfig) -> dict | None:
    """--optimizer muon's settings for configure_optimizer; None for AdamW alone. (gpt2.validate
    calls it first, for its one refusal.)"""
    if o.optimizer != "muon":
        return None
    if torch_version() < MUON_MIN_TORCH:
        raise UserError(f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch "
                        f"{torch.__version__}")
    return dict(muon_lr=o.muon_lr, momentum=o.muon_momentum, weight_decay=o.muon_weight_decay,
                split_qkv=o.muon_qkv == "split")


class MuonAndAdamW(torch.optim.Optimizer):
    """torch.optim.Muon for the blocks' matrices, AdamW for the rest, as one torch optimizer:
    its param_groups are the two optimizers' own group dicts side by side (so GradScaler, a
    learning-rate scheduler, zero_grad and the training loop's lr see one optimizer, and a
    change to a group is its owner's), one step, one state_dict holding both. Muon's groups
    carry lr_scale, its learning rate over AdamW's, so that one schedule drives both. With
    split_qkv the c_attn weights get a group of their own with "split": 3, which muon_step
    (below) honours. In a process group (share, the default) each process orthogonalizes its
    share of the matrices and sends the others the results (muon_step)."""

    def __init__(self, matrices: dict, adamw, lr: float, muon_lr: float, momentum: float,
                 weight_decay: float, split_qkv: bool, share: bool = True):
        qkv = [n for n in matrices if split_qkv and n.endswith("attn.c_attn.weight")]  # in order
        groups = [{"params": [p for n, p in matrices.items() if n not in qkv]}]
        if qkv:
            groups.append({"params": [matrices[n] for n in qkv], "split": 3})
        self.muon = torch.optim.Muon(groups, lr=muon_lr, momentum=momentum, nesterov=True,
                                     weight_decay=weight_decay)
        for group in self.muon.param_groups:
            group["lr_scale"] = muon_lr / lr
        self.adamw = adamw
        self.rank, self.world = process_group_place() if share else (0, 1)
        self.orthogonalize_s = 0.0  # the last step's Newton-Schulz, this process's CPU seconds
        super().__init__([{"params": []}], {})  # a torch optimizer, whose groups are below

    @property
    def param_groups(self) -> list[dict]:  # the two optimizers' own, even once a load replaced them
        return self.muon.param_groups + self.adamw.param_groups

    @param_groups.setter
    def param_groups(self, groups):  # torch.optim.Optimizer.__init__'s empty list: ours are above
        pass

    def step(self, closure=None):
        on_cpu = self.muon.param_groups[0]["params"][0].device.type == "cpu"
        if on_cpu or splits_qkv(self.muon.param_groups) or self.world > 1:
            # bfloat16 matmuls are slow on most CPUs; else torch's own dtype
            dtype = torch.float32 if on_cpu else torch.bfloat16
            self.orthogonalize_s = muon_step(self.muon, dtype, self.rank, self.world)
        else:
            self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict):
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def process_group_place() -> tuple[int, int]:
    """(rank, world size) in the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def splits_qkv(param_groups) -> bool:
    """Whether Muon's groups (live, or a checkpoint's) orthogonalize c_attn in parts."""
    return any(group.get("split", 1) > 1 for group in param_groups)


def newton_schulz_flops(shape, parts: int, steps: int) -> float:
    n, m = sorted((shape[0] // parts, shape[1]))
    return parts * steps * (4 * n * n * m + 2 * n ** 3)


def muon_owners(param_groups, world: int) -> dict:
    """Each Muon parameter's owner: the rank that orthogonalizes its update."""
    params = [(p, g.get("split", 1), g["ns_steps"]) for g in param_groups for p in g["params"]]
    cost = [newton_schulz_flops(p.shape, k, steps) for p, k, steps in params]
    load, owners = [0.0] * world, {}
    for i in sorted(range(len(params)), key=lambda i: (-cost[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += cost[i]
        owners[params[i][0]] = rank
    return owners


@torch.no_grad()
def muon_step(muon: torch.optim.Muon, dtype: torch.dtype, rank: int = 0, world: int = 1) -> float:
    """torch.optim.Muon's step (torch/optim/_muon.py, _single_tensor_muon: the momentum buffer,
    Nesterov by lerp, decoupled decay, its "original" lr adjustment), with three changes torch's
    cannot make. A group's "split": k orthogonalizes each (k*n, m) update as k row blocks of
    (n, m), as if they were k parameters: c_attn's Q, K and V (modded-nanogpt does the same;
    on the README's recipe it lowered the val loss further). The Newton-Schulz iteration
    runs in `dtype`: on CPUs without bfloat16 matrix units (most, this project's among them) a
    bfloat16 matmul runs ~16x slower than a float32 one, and a Muon step of the `small` preset
    took 37 s through torch's step, 1.1-1.5 s in float32 (docs/performance.md). And over
    `world` processes each orthogonalizes its own matrices (muon_owners) and shares them. With
    split 1 and bfloat16 this is torch's step bit for bit; with split 3, three torch parameters;
    shared, one process's step bit for bit (all tested). Returns this process's CPU seconds in
    Newton-Schulz (its wall time would count the waits for the others)."""
    todo = []  # (parameter, its group, its lr factor, its update: this rank's rows under FSDP)
    for group in muon.param_groups:
        lr, momentum = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = muon.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            p.mul_(1 - lr * group["weight_decay"])
            n, m = p.shape[0] // group.get("split", 1), p.shape[1]
            todo.append((p, group, -lr * math.sqrt(max(1, n / m)), update))
    owners = muon_owners(muon.param_groups, world)
    whole = {p: whole_update(p, update, owners[p], rank, world) for p, _, _, update in todo}
    t0 = time.process_time()
    mine = {p: orthogonalize(whole[p], group, dtype) for p, group, _, _ in todo if owners[p] == rank}
    seconds = time.process_time() - t0
    for p, _, alpha, _ in todo:
        local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor's rows, in place
        local.add_(received_update(p, mine.get(p), owners[p], rank, world, dtype), alpha=alpha)
    return seconds


def orthogonalize(update: torch.Tensor, group: dict, dtype) -> torch.Tensor:
    """The update's k row blocks (the group's "split") each orthogonalized, in `dtype`."""
    return torch.cat([newton_schulz(block, group["ns_coefficients"], group["ns_steps"],
                                    group["eps"], dtype) for block in update.chunk(group.get("split", 1))])


def shard_rows(p) -> int:
    """Rows a process holds of a matrix sharded by FSDP2 (torch.chunk's split, padded): all
    but the last ones hold this many."""
    return -(-p.shape[0] // dist.get_world_size())


def whole_update(p, update: torch.Tensor, owner: int, rank: int, world: int):
    """The matrix's whole update on its owner; None on the others under --fsdp, whose rows go
    to the owner (every rank calls this for every matrix, in order)."""
    if not hasattr(update, "to_local"):
        return update
    local = update.to_local()
    padded = local.new_zeros(shard_rows(p), *local.shape[1:])
    padded[:len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
    dist.gather(padded, gathered, dst=owner)
    return torch.cat(gathered)[:p.shape[0]] if rank == owner else None


def received_update(p, mine, owner: int, rank: int, world: int, dtype) -> torch.Tensor:
    """p's orthogonalized update (its owner's `mine`) on every rank: whole by broadcast, or
    under --fsdp this rank's rows by scatter (every rank calls this for every matrix, in
    order). Alone, `mine` itself."""
    if world == 1:
        return mine
    if not hasattr(p, "to_local"):
        out = mine if rank == owner else torch.empty(p.shape, dtype=dtype, device=p.device)
        dist.broadcast(out, src=owner)
        return out
    local, per = p.to_local(), shard_rows(p)
    chunks = None
    if rank == owner:
        padded = mine.new_zeros(per * world, *mine.shape[1:])
        padded[:len(mine)] = mine
        chunks = list(padded.chunk(world))
    out = torch.empty(per, *local.shape[1:], dtype=dtype, device=local.device)
    dist.scatter(out, chunks, src=owner)
    return out[:len(local)]


def newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float, dtype) -> torch.Tensor:
    """torch's _zeropower_via_newtonschulz in `dtype`: (n, m) -> the nearest orthogonal-ish
    matrix, computed on the wide orientation (the Gram matrix is the smaller side squared)."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(dtype).T if tall else g.to(dtype)
    x = x / x.norm().clamp(min=eps)  # not in place: for float32, to() returned g itself
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x
