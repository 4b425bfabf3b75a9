"""Checkpoints on disk: names, the atomic write, the rotation, the verified load, the file
every rank agrees to resume from, and the random generators and optimizer state that make a
resume exact. Chapter 8 of gpt2.py says what a checkpoint holds; this is how it is kept.
"""
from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from config import NOT_RUN_FLAGS, TrainConfig, saved_flags
from plumbing import UserError, atomic_write
from parallel import all_reduce_sum, is_sharded, say
from muon import MuonAndAdamW, shard_rows, splits_qkv

if TYPE_CHECKING:  # annotations only: gpt2.py imports this file, never the other way
    from gpt2 import GPT, Runtime


def rng_state() -> dict:
    """This process's random generators: Python's, numpy's, torch's CPU one and its GPU's."""
    np_state = np.random.get_state()
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]],
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None)


def set_rng_state(state: dict):
    # torch.set_rng_state and torch.cuda.set_rng_state take CPU ByteTensors only, which is
    # why checkpoints are always loaded onto the CPU (Checkpoints.load).
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), *rest))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # this process's GPU (set_device)


def gather_rng_states(runtime: Runtime) -> list[dict]:
    """Every rank's generators, in rank order (on rank 0; the others get theirs too)."""
    if not runtime.ddp:
        return [rng_state()]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng_states(saved: list[dict], runtime: Runtime, dropout: float):
    """Each rank takes back its own generators. A checkpoint of another number of processes
    has no state for some ranks: they all keep the fresh per-rank seeds (chapter 8), which
    only dropout draws from; exact resume needs the same number of processes then."""
    if len(saved) == runtime.world_size:
        set_rng_state(saved[runtime.rank])
    elif dropout > 0:
        say(runtime, f"the checkpoint holds the random generators of {len(saved)} processes, "
                     f"this run has {runtime.world_size}: dropout's masks start afresh")


# A param group's settings are this run's, not the checkpoint's: optimizer.load_state_dict
# would bring back the saved ones. The hyperparameters come from the flags (--weight_decay,
# --muon_momentum, ... changed on --resume apply, as --max_lr and --grad_clip do: one rule for
# every flag, changed_flags says which), and the implementation flags (fused, foreach)
# describe this machine (a CPU checkpoint resumed on a GPU would run unfused; an unfused one
# would leave a fused optimizer's step counters on the CPU, which fused AdamW refuses). So the
# saved groups take all of ours but their parameters before loading, and torch then places
# each tensor where our flags want it.
def with_our_groups(saved: dict, optimizer) -> dict:
    groups = [{**g, **{k: v for k, v in ours.items() if k != "params"}}
              for g, ours in zip(saved["param_groups"], optimizer.param_groups)]
    return {**saved, "param_groups": groups}


def changed_flags(cfg: TrainConfig, saved: dict, runtime: Runtime) -> list[dict]:
    """--resume with other flags than the checkpoint's: every flag is this run's from here on
    (the param groups take them: with_our_groups), but --optimizer, whose state would not fit
    another's: refused. They are printed, and returned with the checkpoint's step for the
    training state's changed_on_resume, which the checkpoints and the model card hold. A flag
    the checkpoint lacks (an older gpt2.py's) counts as unchanged."""
    old = TrainConfig.from_saved(saved, cfg)
    trained_with = old.optimizer.optimizer if saved_flags(saved).get("optimizer") else "adamw"
    if trained_with != cfg.optimizer.optimizer:  # adamw: the flag's default before it existed
        raise UserError(f"the checkpoint was trained with --optimizer {trained_with}: resume with it")
    before = old.flags()
    changed = {k: [before[k], v] for k, v in cfg.flags().items()
               if k not in NOT_RUN_FLAGS and before[k] != v}
    if changed:
        say(runtime, "flags changed since the checkpoint, used from here on: " +
            ", ".join(f"--{k} {a} -> {b}" for k, (a, b) in changed.items()))
    return [{"step": saved["step"], **changed}] if changed else []


def changed_on_resume(saved: dict) -> list[dict]:
    """The flags each earlier resume changed (before the sections: inside the flat flags)."""
    return saved.get("changed_on_resume", (saved.get("args") or {}).get("changed_on_resume", []))



def load_scaler_state(scaler: torch.amp.GradScaler, saved: dict):
    # A bf16 or float32 run saves a disabled scaler's empty state, which an fp16 scaler refuses
    # to load: it then starts from its default scale, as a fresh fp16 run would.
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


# A model's config in a checkpoint must hold its architecture; a field added to GPTConfig
# later takes its default (GPTConfig.from_saved), so an older checkpoint still loads.
ARCHITECTURE = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
CHECKPOINT_KEYS = ("step", "model", "optimizer", "scaler", "loader", "rng", "config")


def optimizer_tensors(value) -> list:
    """Every tensor in an optimizer's state_dict (references, not copies), however nested."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in optimizer_tensors(v)] if isinstance(value, (list, tuple)) else []


# Only Checkpoints.path's names are checkpoints: listed, rotated, held, overwritten and resumed
# from. A user's ckpt_00000004_good.pt, or a damaged one moved aside as
# ckpt_00000008.corrupt.pt, is someone else's file: never read, never deleted.
CHECKPOINT_NAME = re.compile(r"ckpt_(\d{8})\.pt")


class Checkpoints:
    """A run's checkpoints, in its --log_dir: named by their step, written atomically by rank 0,
    the newest `keep` kept, verified when read, and the one to resume from agreed by every
    rank. The one owner of checkpoint files: training, --resume, the log folder's lock and the
    tests all go through it."""

    def __init__(self, log_dir, keep: int = 2):
        self.log_dir, self.keep = Path(log_dir), keep

    def path(self, step: int) -> Path:
        return self.log_dir / f"ckpt_{step:08d}.pt"

    def list(self) -> list[Path]:
        """The checkpoints in log_dir, oldest step first."""
        return sorted(p for p in self.log_dir.glob("ckpt_*.pt") if CHECKPOINT_NAME.fullmatch(p.name))

    @staticmethod
    def step_of(path) -> int:
        return int(CHECKPOINT_NAME.fullmatch(Path(path).name)[1])

    def save(self, step: int, contents: dict, runtime: Runtime) -> Path:
        """Rank 0 writes the checkpoint of `step` and drops the oldest; every rank gets its path."""
        path = self.path(step)
        if runtime.is_main:
            self.write(path, contents)
            self.rotate(path)
        return path

    def write(self, path: Path, contents: dict):
        """torch.save, atomically; a write that fails (a full disk) is one line, and the previous
        checkpoint is untouched."""
        try:
            with atomic_write(path) as f:
                torch.save(contents, f)
        except (OSError, RuntimeError) as e:  # torch's zip writer raises RuntimeError on ENOSPC
            older = [p for p in self.list() if p != path]
            raise UserError(f"cannot write {path} ({getattr(e, 'strerror', None) or e}); the "
                            f"previous checkpoint, {older[-1] if older else 'none'}, is intact") from None

    def rotate(self, path: Path):
        """Keep the newest `keep` checkpoints up to this one; never one of a later step."""
        older = [p for p in self.list() if self.step_of(p) < self.step_of(path)]
        for old in older[:max(0, len(older) - (self.keep - 1))]:
            old.unlink(missing_ok=True)

    @staticmethod
    def load(path, for_training: bool = True) -> dict:
        """A checkpoint's contents, verified, every tensor on the CPU. Never onto the run's GPU: the
        RNG states must stay CPU tensors, and load_state_dict moves weights where they belong.

        torch.load does not check the zip archive's CRCs, so a flipped byte would load as a wrong
        weight: they are checked first (reading the file once more: about a second per GB). Then
        the contents must be ours, and every tensor of the model and the optimizer finite.
        `for_training=False` (sampling, export, --init_from) needs only the model and its config.
        """
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
            if damaged:
                raise UserError(f"{path}: corrupt checkpoint (the CRC of {damaged} does not match); "
                                f"move it away to resume from an older one")
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"{path}: no such checkpoint") from None
        except UserError:
            raise
        except Exception as e:  # zipfile and torch raise several kinds for a damaged file
            raise UserError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}); "
                            f"move it away to resume from an older one") from None
        needed = CHECKPOINT_KEYS if for_training else ("model", "config")
        if (not isinstance(state, dict) or any(k not in state for k in needed)
                or not isinstance(state["config"], dict) or not set(ARCHITECTURE) <= set(state["config"])):
            raise UserError(f"{path}: not a checkpoint of gpt2.py (another program's, or "
                            f"damaged): expected {', '.join(needed)} and a GPT-2 config in it")
        tensors = [*state["model"].values(), *optimizer_tensors(state.get("optimizer") or {})]
        if not all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()):
            raise UserError(f"{path}: holds NaN or infinite weights; move it away to resume from "
                            f"an older one")
        return state

    def agreed(self, runtime: Runtime) -> tuple[Path, dict] | None:
        """The checkpoint every rank resumes from, and its contents: rank 0's newest, or None if
        rank 0 has none.

        Only rank 0 writes checkpoints. Without a filesystem shared by all machines, the other
        nodes' --log_dir may hold an older checkpoint or none: each rank resuming from its own
        newest would diverge silently, or hang in a collective until the timeout. So rank 0
        decides, every rank checks that it can read that very file, and if one cannot, all stop
        with the same line.
        """
        newest = self.list()
        step = torch.tensor([self.step_of(newest[-1]) if newest else -1], device=runtime.device)
        if runtime.ddp:
            dist.broadcast(step, src=0)
        if step.item() < 0:
            return None
        path = self.path(step.item())
        failed, state, error = torch.zeros(runtime.world_size, device=runtime.device), None, None
        try:
            state = self.load(path)
        except UserError as e:
            failed[runtime.rank], error = 1, e
        if not runtime.ddp and error:
            raise error
        all_reduce_sum(failed, runtime)
        if failed.any():
            ranks = failed.nonzero().flatten().tolist()
            raise UserError(f"cannot resume from {path}: rank(s) {ranks} cannot read it "
                            f"({error or 'missing or damaged there'}); without a shared "
                            f"filesystem, copy it to every node")
        return path, state


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, model: GPT | None = None):
    """A checkpoint's optimizer state, with this machine's flags; into a sharded model's
    optimizer (--fsdp) through the parameters' names."""
    if isinstance(optimizer, MuonAndAdamW):
        saved_split = splits_qkv(saved["muon"]["param_groups"])
        if saved_split != splits_qkv(optimizer.muon.param_groups):
            raise UserError(f"the checkpoint was trained with --muon_qkv "
                            f"{'split' if saved_split else 'whole'}: resume with it")
        # the whole momentum, our groups' settings; under --fsdp, each rank keeps its rows
        optimizer.muon.load_state_dict(with_our_groups(saved["muon"], optimizer.muon))
        for p, state in optimizer.muon.state.items():
            if hasattr(p, "to_local") and "momentum_buffer" in state:
                rows, per = torch.zeros_like(p), shard_rows(p)
                rows.to_local().copy_(state["momentum_buffer"][dist.get_rank() * per:][:per])
                state["momentum_buffer"] = rows
        return load_optimizer_state(optimizer.adamw, saved["adamw"], model)
    saved = with_our_groups(saved, optimizer)
    groups = saved["param_groups"]
    if model is None or not is_sharded(model):
        return optimizer.load_state_dict(saved)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    name_of = {p: n for n, p in model.named_parameters()}
    names = [name_of[p] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {names[i]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups]}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


def optimizer_state(model: GPT, optimizer) -> dict:
    """optimizer.state_dict() as an unsharded run's (state keyed by parameter number in group
    order), whether sharded or not: one checkpoint format for every mode."""
    if isinstance(optimizer, MuonAndAdamW):  # Muon's momentum gathered whole, one at a time
        muon = optimizer.muon.state_dict()
        muon["state"] = {i: {k: v.full_tensor().cpu() if hasattr(v, "full_tensor") else v
                             for k, v in s.items()} for i, s in muon["state"].items()}
        return {"muon": muon, "adamw": optimizer_state(model, optimizer.adamw)}
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    saved = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))  # keyed by parameter name; {} off rank 0
    if not saved:
        return {}
    number: dict[str, int] = {}
    groups = [{**g, "params": [number.setdefault(n, len(number)) for n in g["params"]]}
              for g in saved["param_groups"]]
    return {"state": {number[n]: s for n, s in saved["state"].items()}, "param_groups": groups}
