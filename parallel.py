"""The machine and its processes: the device and dtype chosen, what torchrun passes, joining
the process group, the agreement on a failure (one rank's error stops all of them, with its
line), and parallelize (activation checkpointing, FSDP2's fully_shard, or compile and DDP),
the state dicts in and out of a sharded model, and the plain copy evaluation runs on. Chapter 5
of gpt2.py tells the story; this is what it calls.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from plumbing import UserError, os_error_line

if TYPE_CHECKING:  # annotations only: gpt2.py imports this file, never the other way
    from config import MachineConfig, TrainConfig
    from gpt2 import GPT, Runtime


def all_reduce_sum(t: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def say(runtime: Runtime, *message):
    """Print, from rank 0 only: one line per event, not one per GPU."""
    if runtime.is_main:
        print(*message, flush=True)


def named_device(name: str, local_rank: int | None) -> torch.device:
    """--device cpu, cuda, cuda:N or mps, checked. Under torchrun (local_rank given) a plain
    `cuda` means LOCAL_RANK's GPU, modulo the GPUs this process sees (SLURM's --gpus-per-task
    shows each process one, cuda:0, while numbering the processes 0..7)."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but torch sees no CUDA GPU")
        if device.index is not None and local_rank is not None:
            raise UserError(f"--device {name} under torchrun: every process would use that one "
                            f"GPU; pass --device cuda and each takes its LOCAL_RANK's")
        index = device.index if device.index is not None else (local_rank or 0)
        return torch.device("cuda", index % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps, but torch has no MPS backend here")
    return device


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """--device auto prefers a CUDA GPU, LOCAL_RANK's, then Apple's mps, then the CPU."""
    if name != "auto":
        return named_device(name, local_rank)  # checked
    if torch.cuda.is_available():
        # Modulo the GPUs this process sees: a launcher may show each process only its own.
        return torch.device("cuda", (local_rank or 0) % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype auto: bf16 where tensor cores have it (compute capability 8.0, Ampere, and
    newer), fp16 on older GPUs (T4, V100), float32 on CPU and mps. Not is_bf16_supported(): on
    recent torch it says True on a T4 too, where bf16 is emulated and slower than float32."""
    if name != "auto":
        warn_if_emulated(DTYPES[name], device)
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.float32


def torchrun_variables() -> tuple[int | None, int | None, int | None]:
    """(RANK, LOCAL_RANK, WORLD_SIZE) as torchrun sets them, checked before anything waits on
    them; (None, None, None) without RANK: one process."""
    if "RANK" not in os.environ:
        return None, None, None
    if "WORLD_SIZE" not in os.environ:
        raise UserError(f"RANK={os.environ['RANK']} is set but WORLD_SIZE is not: start the "
                        f"processes with torchrun, which sets both (or unset RANK)")
    values = {}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        text = os.environ.get(name, "0")
        try:
            values[name] = int(text)
        except ValueError:
            raise UserError(f"{name}={text!r} is not a whole number (torchrun sets it)") from None
    rank, local_rank, world_size = values.values()
    if not 0 <= rank < world_size or local_rank < 0:
        raise UserError(f"RANK {rank} of WORLD_SIZE {world_size} (LOCAL_RANK {local_rank}): "
                        f"RANK must be 0 .. WORLD_SIZE - 1, LOCAL_RANK 0 or more (torchrun sets "
                        f"them)")
    return rank, local_rank, world_size


RENDEZVOUS_S = 300  # processes a launcher starts together meet in seconds, not an hour


def join_process_group(backend: str, rank: int, world_size: int, timeout_s: float):
    """init_process_group, its rendezvous (every process connecting to MASTER_ADDR:MASTER_PORT)
    first, waiting at most RENDEZVOUS_S or --dist_timeout: a process whose partners never
    start (WORLD_SIZE=2, one process) or a port another program holds is one line soon, not a
    traceback after the hour --dist_timeout gives the collectives."""
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UserError(f"RANK and WORLD_SIZE are set, MASTER_ADDR and MASTER_PORT not ({where}):"
                        f" start the processes with torchrun, which sets them")
    wait = min(timeout_s, RENDEZVOUS_S)
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, world_size,
                                           timeout=datetime.timedelta(seconds=wait)))
    except (RuntimeError, ValueError) as e:  # torch's DistNetworkError, DistStoreError, ...
        said = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("another program holds MASTER_PORT: give torchrun another --master_port"
                if "EADDRINUSE" in str(e) or "in use" in str(e) else
                f"not all {world_size} processes of WORLD_SIZE started within {wait:.0f} s: start "
                f"every one (torchrun --nproc_per_node, --nnodes)" if "out" in said.lower() else
                "check MASTER_ADDR and MASTER_PORT")
        raise UserError(f"cannot join the process group at {where} as rank {rank} of "
                        f"{world_size}: {hint} ({said})") from None
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def warn_if_emulated(dtype: torch.dtype, device: torch.device):
    if dtype == torch.bfloat16 and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            print(f"warning: --dtype bfloat16 on a GPU of compute capability "
                  f"{capability[0]}.{capability[1]}: emulated, slower than float32; --dtype auto "
                  f"picks float16 with loss scaling", file=sys.stderr, flush=True)


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums over many terms, except on Apple's mps, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


FAILURE_KEY = "gpt2/failed"  # in the process group's store: which rank failed, and why


@contextlib.contextmanager
def out_of_memory_as_one_line():
    """A GPU out of memory is a flag to change, not a bug: one line that names it."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError("out of GPU memory: lower --batch_size (or use --batch_size auto); "
                        "gradient accumulation keeps --total_batch_size, so the run optimizes "
                        "the same") from None


class Stopped(Exception):
    """A signal asked the run to stop; it did, after a step and its checkpoint."""

    def __init__(self, signal_name: str | None, step: int, path: Path, runtime: Runtime):
        # signal_name None: another rank got the signal (or failed to write the log)
        super().__init__(f"{signal_name or 'stop'} after step {step}: saved {path}; continue "
                         f"with --resume")
        self.code = 128 + getattr(signal, signal_name or "SIGTERM")  # the shell's convention
        self.quiet = not runtime.is_main  # one line for the run, not one per process


@contextlib.contextmanager
def fail_together(runtime: Runtime):
    """A rank that fails stops every rank at once, each with the failing rank's message.

    Without this, the others wait in their next collective for the failed one until
    --dist_timeout (an hour): NCCL cannot tell a dead peer from a slow one, and leaving the
    process group politely (destroy_process_group) can itself wait on them. So the failing
    rank writes its message into the store all ranks share (torchrun's rendezvous) and exits
    without leaving; every rank watches that store from a thread, and exits with the message.
    """
    if not runtime.ddp:
        with out_of_memory_as_one_line():
            yield
        return
    store = dist.distributed_c10d._get_default_store()
    watching = threading.Event()
    watching.set()
    watcher = threading.Thread(target=watch_for_failure, args=(store, watching), daemon=True)
    watcher.start()
    try:
        with out_of_memory_as_one_line():
            yield
    except Stopped:
        stop_watching(watching, watcher)
        dist.destroy_process_group()  # every rank stopped together: leave politely
        raise
    except BaseException as e:
        watching.clear()
        first = not store_has(store, FAILURE_KEY)
        bug = not isinstance(e, (UserError, OSError, KeyboardInterrupt))
        reason = (f"{type(e).__name__}: {e}" if bug else os_error_line(e) if isinstance(e, OSError)
                  else "interrupted" if isinstance(e, KeyboardInterrupt) else str(e))
        if first:
            with contextlib.suppress(Exception):
                store.set(FAILURE_KEY, f"rank {runtime.rank}: {reason}")
        if first or not bug:
            if bug:  # not the user's: its traceback, and the rank it hit
                traceback.print_exc()
                reason = f"rank {runtime.rank}: {reason}"
            print(f"error: {reason}", file=sys.stderr, flush=True)  # a user's: as on every rank
        else:  # a consequence (a peer gone mid-collective): the cause is the first failure
            print(f"error: stopping: {store.get(FAILURE_KEY).decode()}", file=sys.stderr, flush=True)
        os._exit(1)
    stop_watching(watching, watcher)
    dist.destroy_process_group()


def stop_watching(watching: threading.Event, watcher: threading.Thread):
    """End the watcher before the process group goes: a thread still inside a call to the
    store when the store is torn down aborts the process at exit ("terminate called without
    an active exception", exit code -6)."""
    watching.clear()
    watcher.join(timeout=10)


def store_has(store, key: str) -> bool:
    with contextlib.suppress(Exception):
        return store.check([key])
    return False


def watch_for_failure(store, watching: threading.Event):
    """fail_together's watcher. After seeing a failure it waits a little, so that a rank whose
    own error comes at the same time (every rank refusing the same flag) says its own."""
    while watching.is_set():
        if store_has(store, FAILURE_KEY):
            time.sleep(2)
            if watching.is_set():
                print(f"error: stopping: {store.get(FAILURE_KEY).decode()}", file=sys.stderr,
                      flush=True)
                os._exit(1)
        time.sleep(0.5)


def local_rank0_first(runtime: Runtime, fn):
    """fn() on each machine's first process (LOCAL_RANK 0), then on the others: what fn
    downloads into the machine's cache is fetched once per machine, not by 8 processes into
    the same file (the download also holds a lock on its file, for caches that machines
    share). If a first process fails, every rank stops, with its message."""
    first = runtime.local_rank == 0
    result = error = None
    if first:
        try:
            result = fn()
        except UserError as e:
            error = e
    if runtime.ddp:
        failed = torch.tensor([error is not None], device=runtime.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # also the barrier: the others wait here
        if failed.item() and not error:
            raise UserError("another machine's first process failed to prepare the data or "
                            "weights (its error is in its output)")
    if error:
        raise error
    return result if first else fn()


FSDP_MIN_TORCH = (2, 6)  # torch.distributed.fsdp.fully_shard is public from 2.6


def torch_version() -> tuple[int, int]:
    return tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])


def check_machine_flags(machine: MachineConfig, batch_size: int | str):
    """--fsdp's refusals, for gpt2.validate: before any process group."""
    if not machine.fsdp:
        return
    if torch_version() < FSDP_MIN_TORCH:
        raise UserError(f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this "
                        f"is torch {torch.__version__}")
    if batch_size == "auto":
        raise UserError("--fsdp needs a --batch_size: auto tries micro-batches on each GPU "
                        "alone, which sharded training cannot (every step is collective)")


def parallelize(model: GPT, cfg: TrainConfig, runtime: Runtime,
                fitting_batch_size: Callable) -> tuple[nn.Module, int]:
    """The model as training runs it, made before its optimizer (which must see FSDP's shards),
    and the micro-batch it runs (--batch_size, or auto's, which is tried on it):
    --activation_checkpointing; then --fsdp's shards (each block compiled first), or
    torch.compile and DDP around the compiled model (torch's advice: compile handles DDP's
    wrapper poorly, so compile the inner module), with --batch_size auto tried in between,
    on each process alone, before DDP's collectives.
    The raw model keeps its parameters and plain state_dict keys; what the rest needs of the
    sharding reads it off the model: model_state and load_model_state (the checkpoint's
    tensors in and out), evaluation_model (a plain copy), and training.memory_per_process."""
    batch_size, compiled = cfg.recipe.batch_size, cfg.resolved.compile
    if cfg.machine.activation_checkpointing:
        recompute_activations(model)
    if cfg.machine.fsdp:
        shard_model(model, compiled, runtime)
        return model, batch_size  # a number: validate() refused auto
    # dynamic=False: one graph per shape, so the sizes tried never make it compile a slower,
    # shape-generic one.
    train_model = torch.compile(model, dynamic=False) if compiled else model
    if batch_size == "auto":
        batch_size = fitting_batch_size(train_model, cfg, runtime)
    if runtime.ddp:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=device_ids)
    return train_model, batch_size


def recompute_activations(model: GPT):
    """--activation_checkpointing: a block's activations are not kept for the backward pass but
    computed again in it (torch.utils.checkpoint, non-reentrant), trading a second forward pass
    for the memory of all but each block's input. The random generators are replayed, so
    dropout draws the same masks: the same losses and gradients. Only in training (with
    gradients): evaluation and generation run the blocks as they are."""
    from torch.utils.checkpoint import checkpoint
    for block in model.transformer.h:
        def forward(x, cache=None, block_forward=block.forward):
            if cache is None and torch.is_grad_enabled():
                return checkpoint(block_forward, x, use_reentrant=False)
            return block_forward(x, cache)
        block.forward = forward  # this block's own: its parameters keep their names


def shard_model(model: GPT, compiled: bool, runtime: Runtime):
    """--fsdp: FSDP2 (torch.distributed.fsdp.fully_shard), in place. Each Block is a group of its
    own, gathered just before it runs and freed after; then the root, whose group holds the
    rest: the tied wte/lm_head weight (one parameter, so one group: torch refuses a tied
    weight split over two), wpe, ln_f. Under bf16 or fp16 the blocks compute in it
    (MixedPrecisionPolicy) and gradients are reduced in float32; the weights and the optimizer
    stay float32. With --compile each block is compiled first, in place (its keys stay plain)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    half = runtime.dtype if runtime.dtype != torch.float32 else None
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32 if half else None)
    for block in model.transformer.h:
        if compiled:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    return type(model).__name__.startswith("FSDP")  # fully_shard made the model's class FSDPGPT


def model_state(model: GPT) -> dict:
    """The model's state_dict, plain keys on the CPU, whether sharded or not. Under --fsdp every
    rank must call it (a gather); rank 0 gets the tensors, the others {}."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if state:  # gathered as two tensors: tied again, else torch.save would write both
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def load_model_state(model: GPT, saved: dict):
    if not is_sharded(model):
        return model.load_state_dict(saved)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True))


def evaluation_model(model: GPT, runtime: Runtime, plain: type) -> GPT:
    """The model evaluation and generation run: the training model itself, or under --fsdp a
    plain copy (of class `plain`, GPT) on each GPU, gathered for this evaluation (whose every call would otherwise be
    a collective that all ranks must make alike, which per-rank shares and rank 0's samples
    are not)."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    copy = plain(model.config).to(runtime.device)
    full["lm_head.weight"] = full["transformer.wte.weight"]
    copy.load_state_dict(full)
    return copy.train(model.training)


def smallest_over_ranks(value: int, runtime: Runtime) -> int:
    if not runtime.ddp:
        return value
    t = torch.tensor([value], device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
