"""The training run's machinery, behind chapter 9's loop: the log folder and its lock, the event
log (log.jsonl) and the dashboards that mirror it, the stop signals, the finite and spike
checks, when to evaluate and with what data, the batch arithmetic, MFU's FLOPs and peaks,
memory per process.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn

import hellaswag

from plumbing import UserError, atomic_write, exclusive_lock
from parallel import Stopped, all_reduce_sum, local_rank0_first, say
from checkpoints import Checkpoints, optimizer_tensors

if TYPE_CHECKING:  # annotations only: gpt2.py imports this file, never the other way
    from config import LogsConfig, RecipeConfig, TrainConfig
    from gpt2 import GPT, GPTConfig, Runtime, TrainState


LEFTOVER_NAME = re.compile(r"(ckpt_\d{8}\.pt|log\.jsonl)\.\d+\.[0-9a-f]{8}\.tmp")


@contextlib.contextmanager
def own_log_dir(logs: LogsConfig, runtime: Runtime):
    """--log_dir, held by this run alone for its life (rank 0 writes everything in it).

    A fresh run (no --resume) in a folder that holds a run is refused, unless --overwrite says
    to delete that run's log and checkpoints: otherwise the new run would interleave its log
    with the old one and overwrite its checkpoints. A dead run's half-written temporary files
    (19 GB for gpt2-xl) are removed: holding the lock, we know no live run is writing them.
    """
    if not runtime.is_main:
        yield
        return
    log_dir = Path(logs.log_dir)
    if log_dir.exists() and not log_dir.is_dir():
        raise UserError(f"--log_dir {log_dir} is a file, not a folder")
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--log_dir {log_dir}: cannot create it ({e.strerror})") from None
    with exclusive_lock(log_dir / ".lock", busy=f"another run is using {log_dir}: wait for it "
                                                f"to finish, or give this one another --log_dir"):
        for leftover in log_dir.glob("*.tmp"):  # atomic_write's names for ours, and only those
            if LEFTOVER_NAME.fullmatch(leftover.name):
                leftover.unlink(missing_ok=True)
        held = [p for p in [log_dir / "log.jsonl", *Checkpoints(log_dir).list()] if p.exists()]
        if held and not logs.resume:
            if not logs.overwrite:
                raise UserError(f"{log_dir} holds a run ({', '.join(p.name for p in held[:3])}"
                                f"{', ...' if len(held) > 3 else ''}): continue it with "
                                f"--resume, or start over with --overwrite (deletes them)")
            for path in held:
                path.unlink()
        yield


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM paper, appendix B): 6 per parameter that takes part in a
    matmul (forward 2, backward 4), plus attention's QK^T and AV, 12 * n_layer * T * n_embd.
    Over the device's peak FLOP/s, this gives MFU: the fraction of the hardware we use."""
    c = config
    matmul_params = 12 * c.n_layer * c.n_embd ** 2 + c.n_embd * c.padded_vocab_size
    return 6 * matmul_params + 12 * c.n_layer * seq_len * c.n_embd


# Datasheet FLOP/s, dense (no sparsity), of the GPUs MFU knows: (bf16/fp16, float32 as TF32;
# V100 and T4 have no TF32: their float32). Names as torch.cuda.get_device_name() gives them,
# matched as whole words and case-blind, the more specific first ("H100 NVL" before "H100").
PEAK_FLOPS = [
    ("B200", 2250e12, 1100e12), ("GH200", 989e12, 495e12), ("H200 NVL", 835e12, 418e12),
    ("H200", 989e12, 495e12), ("H100 NVL", 835e12, 418e12), ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 495e12), ("H800 PCIe", 756e12, 378e12), ("H800", 989e12, 495e12),
    ("A100", 312e12, 156e12), ("A10G", 125e12, 62.5e12), ("A10", 125e12, 62.5e12),
    ("L40S", 362e12, 183e12), ("L40", 181e12, 90.5e12), ("L4", 121e12, 60e12),
    ("RTX 6000 Ada", 364e12, 182e12), ("RTX A6000", 155e12, 77.4e12),
    ("RTX 4090", 165e12, 82.6e12), ("RTX 3090", 71e12, 35.6e12), ("V100S", 130e12, 16.4e12),
    ("V100-PCIE", 112e12, 14e12), ("V100 PCIe", 112e12, 14e12), ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12)]


def peak_flops_of(gpu_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak of a GPU named like "NVIDIA L4", for dtype; None if unknown (then the
    log has no MFU). Whole words: "L4" is not found in "L40S", nor "A10" in "A100"."""
    for name, half, single in PEAK_FLOPS:
        if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", gpu_name, re.IGNORECASE):
            return single if dtype == torch.float32 else half
    return None


def datasheet_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), dtype)


# log.jsonl's events, as read back (by --resume, plot, export's model card, the dashboards): a
# JSON object with a whole-number step, each number it holds a number. Anything else (a line a
# kill cut short, a hand edit such as {"step": "3"} or "loss": null) is left out; each line
# left out but a cut last one is named in one warning.
EVENT_NUMBERS = ("loss", "lr", "norm", "ms", "tokens_per_s", "mfu", "val_loss", "hellaswag")


def well_formed(event) -> bool:
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return (isinstance(event, dict) and isinstance(event.get("step"), int)
            and not isinstance(event["step"], bool) and event["step"] >= 0
            and all(number(event[k]) for k in EVENT_NUMBERS if k in event))


def parse_events(path: Path, lines: list[str]) -> list[tuple[str, dict]]:
    """The well-formed events of log.jsonl's lines, each with its line; a warning names the
    others."""
    kept, bad = [], []
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if well_formed(event):
            kept.append((line, event))
        elif line.strip() and not (event is None and number == len(lines)):  # not one cut short
            bad.append(number)
    if bad:
        print(f"warning: {path}: left out {len(bad)} malformed line{'s' * (len(bad) > 1)} "
              f"({', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}): each line "
              f"must be a JSON object with a whole-number step", file=sys.stderr, flush=True)
    return kept


def is_evaluation(event: dict) -> bool:
    return "loss" not in event and "config" not in event


class EventLog:
    """Each event of the run: one JSON object a line in <log_dir>/log.jsonl (rank 0 only), and
    one line on the console. A fresh run's first event is its configuration."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, state: TrainState, grad_accum: int,
                 max_steps: int, stop: StopSignals):
        self.path, self.runtime, self.state = Path(cfg.logs.log_dir) / "log.jsonl", runtime, state
        r = cfg.recipe
        self.stop, self.evaluated_steps = stop, set()
        # With a fresh run's first step, what each process holds once all of it exists (a resumed
        # run keeps that event, and its log stays the uninterrupted run's).
        self.memory_logged = state.step > 0
        # MFU: the model's FLOPs per second over the hardware's peak, of every GPU together
        peak = cfg.machine.peak_flops or datasheet_peak_flops(runtime.device, runtime.dtype)
        self.mfu_per_token_s = (flops_per_token(state.model.config, r.seq_len) /
                                (peak * runtime.world_size)) if peak else 0
        if runtime.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if state.step > 0 and self.path.exists():
                # A resumed run forgets what the interrupted one logged after its checkpoint:
                # it keeps the steps before it and the evaluation at it (its training step, the
                # checkpoint's step, is logged again).
                kept = [(line, e) for line, e in parse_events(self.path, self.path.read_text().splitlines())
                        if e["step"] < state.step or e["step"] == state.step and "loss" not in e]
                with atomic_write(self.path) as f:
                    f.write("".join(line + "\n" for line, _ in kept).encode())
                self.evaluated_steps = {e["step"] for _, e in kept if is_evaluation(e)}
            else:
                self.path.unlink(missing_ok=True)  # a fresh run (own_log_dir allowed it)
        say(runtime, f"{state.model.num_params():,} parameters | {runtime.world_size} x "
                     f"{runtime.device.type} {str(runtime.dtype).removeprefix('torch.')} | "
                     f"{r.total_batch_size:,} tokens/step = {cfg.resolved.batch_size} x "
                     f"{r.seq_len} x {grad_accum} accum x {runtime.world_size} | "
                     f"{max_steps} steps ({state.loader.steps_per_epoch} per epoch)")
        self.dashboards = Dashboards(cfg, runtime, state.step)  # this file's end
        if state.step == 0:
            self.write(step=0, model=cfg.model.init_from or cfg.model.model or "gpt2",
                       config=asdict(state.model.config), total_batch_size=r.total_batch_size,
                       world_size=runtime.world_size)

    def write(self, **event):
        if "tokens_per_s" in event and self.mfu_per_token_s:
            event["mfu"] = self.mfu_per_token_s * event["tokens_per_s"]
        if "loss" in event and not self.memory_logged:
            event["memory_mib"] = memory_per_process(self.state, self.runtime)
            self.memory_logged = True
        if is_evaluation(event):
            self.evaluated_steps.add(event["step"])
        if self.runtime.is_main:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(event) + "\n")
            except OSError as e:  # a full disk: the run stops at the step's end, saving first
                self.stop.fail(f"cannot write {self.path} ({e.strerror or e})")
            self.dashboards.write(event)  # --tensorboard, --wandb
        print_event(event, self.runtime)

    def evaluated(self, step: int) -> bool:
        """Whether log.jsonl holds the evaluation of this step (a resumed run's first may)."""
        return step in self.evaluated_steps


def print_event(event: dict, runtime: Runtime):
    if "config" in event:
        return
    if "loss" in event:
        say(runtime, f"step {event['step']:6d} | loss {event['loss']:.4f} | lr {event['lr']:.2e} "
                     f"| norm {event['norm']:.3f} | {event['ms']:.0f} ms | "
                     f"{event['tokens_per_s']:,.0f} tok/s" +
                     (f" | MFU {100 * event['mfu']:.1f}%" if "mfu" in event else ""))
        if memory := event.get("memory_mib"):
            say(runtime, "memory per process, MiB: " + " | ".join(f"{k} {v:,.1f}" for k, v in memory.items()
                                                                if v is not None))
        if "skipped" in event:
            say(runtime, f"step {event['step']} skipped (--skip_spikes): {event['skipped']}")
        return
    parts = [f"{k} {v:.4f}" for k, v in event.items() if isinstance(v, float)]
    say(runtime, f"step {event['step']:6d} | eval | " + " | ".join(parts))
    for text in event.get("samples", []):
        say(runtime, "  >", text.replace("\n", " ")[:200])


def local_mib(tensors) -> float:
    """MiB of these tensors held by this process: under FSDP each holds its shard (to_local)."""
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def rusage():
    """This process's resource usage (getrusage), or None where it does not exist: Windows."""
    try:
        import resource  # Linux and macOS
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF)


def peak_memory_mib(device) -> dict:
    """The peak so far: the GPU's allocations, or this process's resident set on a CPU."""
    if device.type == "cuda":
        return {"peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20}
    usage = rusage()  # ru_maxrss is KiB on Linux, bytes on macOS
    rss = usage and usage.ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
    return {"peak_rss_mib": rss}


def memory_per_process(state: TrainState, runtime: Runtime) -> dict:
    """What this process holds after a step: parameters, gradients, optimizer state (the
    figures FSDP divides by the number of processes), and its peak memory so far: the GPU's
    allocations, or the process's resident set on a CPU (which counts everything else too)."""
    params = list(state.model.parameters())
    memory = {"parameters": local_mib(params), "gradients": local_mib(p.grad for p in params),
              "optimizer": local_mib(optimizer_tensors(state.optimizer.state_dict()))}
    return memory | {"peak": next(iter(peak_memory_mib(runtime.device).values()))}


def read_events(log_dir) -> list[dict]:
    path = Path(log_dir) / "log.jsonl"
    if not path.exists():
        raise UserError(f"no {path}: train with --log_dir {log_dir} first")
    return [event for _, event in parse_events(path, path.read_text().splitlines())]


def no_sync_unless(syncs: bool, train_model: nn.Module):
    """DDP's no_sync() for a micro-batch whose gradients wait for the last one's all-reduce;
    nothing to skip without DDP. (FSDP reduce-scatters each micro-batch's gradients, by
    choice: set_requires_gradient_sync(False) would keep them unsharded, a memory cost.)"""
    if syncs or not isinstance(train_model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return train_model.no_sync()


def step_numbers(loss_sum: torch.Tensor, norm: torch.Tensor, stop: StopSignals,
                 runtime: Runtime) -> tuple[float, float, bool]:
    """A step's mean loss over the ranks, its gradient norm, and whether any rank must stop:
    one all-reduce and one read-back from the GPU for the three."""
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    loss, norm, stopping = (all_reduce_sum(torch.stack([loss_sum, norm, stop.flag(norm)]),
                                           runtime) / runtime.world_size).tolist()
    return loss, norm, bool(stopping)


def check_finite(loss: float, norm: float, state: TrainState, cfg: TrainConfig) -> dict:
    """Stop before the optimizer applies a non-finite loss or gradient, so that no NaN weight
    is ever stepped, saved, or rotated in place of a good checkpoint. (fp16's gradient scaler
    skips a step with an inf gradient itself and lowers its scale: that is its job.) Then the
    spike guard: {} for a step to take, or what log.jsonl says of a skipped one."""
    bad = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
    if bad[0] == "gradient norm" and not math.isfinite(norm) and state.scaler.is_enabled():
        return {}
    if math.isfinite(bad[1]):
        return skip_spike(loss, norm, state.spikes, state.step, cfg.recipe)
    last = Checkpoints(cfg.logs.log_dir).list()
    raise UserError(f"{bad[0]} is {bad[1]} at step {state.step}: stopping before the optimizer "
                    f"step. Lower --max_lr or check the data; last good checkpoint: "
                    f"{last[-1] if last else 'none'}")


# The spike guard, --skip_spikes Z (llm.c's outlier detector): a step whose loss or gradient
# norm lies more than Z standard deviations above the mean of the last SPIKE_WINDOW taken
# steps' is not taken (its batch is spent, the step counted, and log.jsonl's step event says
# "skipped" and why). No step is skipped before SPIKE_WARMUP taken steps of statistics: early
# on the mean and deviation of a few steps say little, and the first steps' norms move fast.
# A skipped step's values stay out of the statistics, or one spike would widen them for the
# next. --skip_spikes_limit K skips in a row stop the run with one line: then it is the run,
# not a batch, that changed (it diverges, or the data did), and skipping would only stall it.
# The statistics are the training state's (a checkpoint holds them), so resume is exact.
SPIKE_WINDOW, SPIKE_WARMUP = 128, 32


def skip_spike(loss: float, norm: float, stats: dict, step: int, r: RecipeConfig) -> dict:
    if not r.skip_spikes:
        return {}
    values = {"loss": loss, "gradient norm": norm}
    outliers = [f"{name} {value:.4g} is {z:.1f} standard deviations above the mean "
                f"{np.mean(stats[name]):.4g} of the last {len(stats[name])} steps"
                for name, value in values.items()
                if (z := spike_z(stats.get(name, []), value)) > r.skip_spikes]
    if not outliers:
        for name, value in values.items():
            stats[name] = [*stats.get(name, []), value][-SPIKE_WINDOW:]
        stats["in_a_row"] = 0
        return {}
    stats["in_a_row"] = stats.get("in_a_row", 0) + 1
    if stats["in_a_row"] >= r.skip_spikes_limit:
        raise UserError(f"step {step}: {stats['in_a_row']} steps in a row skipped as spikes "
                        f"(--skip_spikes {r.skip_spikes}), the last as its {outliers[0]}: "
                        f"the run itself has changed; lower --max_lr, or check the data")
    return {"skipped": "; ".join(outliers)}


def spike_z(history: list[float], value: float) -> float:
    """How many standard deviations value lies above history's mean (0 while warming up)."""
    std = float(np.std(history)) if len(history) >= SPIKE_WARMUP else 0.0
    return (value - float(np.mean(history))) / std if std > 0 else 0.0


class StopSignals:
    """SIGTERM (what SLURM, Kubernetes and spot instances send before they kill), SIGUSR1 (a
    SLURM --signal) and Ctrl-C set a flag, read at the end of each step and between the
    batches of an evaluation; the run then writes a checkpoint and exits. The first Ctrl-C
    says so; a second stops at once. A log.jsonl that cannot be written (a full disk) stops
    the run the same way, with its error. Handlers can only be installed from the main
    thread: elsewhere (a test's thread) the run simply has none."""

    NAMES = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __enter__(self):
        self.name, self.failure, self.save, self.previous = None, None, None, {}
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if hasattr(signal, name):  # Windows has no SIGUSR1
                    number = getattr(signal, name)
                    self.previous[number] = signal.signal(number, self.received)
        return self

    def received(self, number, frame):
        if self.name == "SIGINT" and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(number).name
        if os.environ.get("RANK", "0") == "0":  # one line for the run
            said = ("Ctrl-C: stopping after this step; Ctrl-C again to quit without a checkpoint"
                    if self.name == "SIGINT" else
                    f"{self.name}: stopping after this step, with a checkpoint")
            try:  # the handler may interrupt a print: then a plain write
                print(said, flush=True)
            except RuntimeError:
                os.write(1, (said + "\n").encode())

    def fail(self, message: str):
        self.failure = self.failure or message

    def flag(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full_like(like, float(self.name is not None or self.failure is not None))

    def on_stop(self, save):
        """save() writes the checkpoint of now and returns its path, for a stop mid-evaluation."""
        self.save = save

    def check(self, runtime: Runtime):
        """Between an evaluation's batches: if a rank was asked to stop, every rank writes the
        checkpoint now and stops (torchrun kills its workers 30 s after a SIGTERM: a long
        evaluation would outlast that). One small all-reduce, the same on every rank. The
        evaluation is cut short, and not logged: --resume runs it again."""
        stopping = self.flag(torch.zeros((), device=runtime.device))
        if self.save is not None and all_reduce_sum(stopping, runtime).item() > 0:
            path = self.save()
            raise self.stopped(Checkpoints.step_of(path), path, runtime)

    def stopped(self, step: int, path: Path, runtime: Runtime) -> Exception:
        """What the run raises once the checkpoint of `step` is written: Stopped, or the error
        that stopped it."""
        if self.failure:
            return UserError(f"{self.failure}: stopped after step {step}, saved {path}; make "
                             f"room, then continue with --resume")
        return Stopped(self.name, step, path, runtime)

    def __exit__(self, exc_type, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        if exc_type is None and self.failure:  # the end of the run, its checkpoint written
            raise UserError(f"{self.failure}: the run finished and saved its final checkpoint")


def evaluation_batches(n_seq: int, batch_size: int, stop: StopSignals | None, runtime: Runtime):
    """This rank's sequences of each batch of an evaluation of n_seq sequences: of batch_size
    * world_size sequences each, every world_size-th one this rank's. Every rank goes through
    as many batches (on the last, a rank may have none), so that a stop signal, checked before
    each, cuts it short on all ranks at once."""
    per_batch = batch_size * runtime.world_size
    for first in range(0, n_seq, per_batch):
        if stop is not None:
            stop.check(runtime)
        mine = range(first + runtime.rank, min(n_seq, first + per_batch), runtime.world_size)
        if mine:
            yield mine


def evaluation_due(step: int, evaluations: list[tuple], r: RecipeConfig, last: bool) -> bool:
    """An evaluation at this step: on any evaluation's schedule (--eval_every's, HellaSwag's,
    CORE's), whether it runs or not, and at the end."""
    return last or any(every and step % every == 0
                       for every in {getattr(r, e.every) for e, _ in evaluations})


def run_length(r: RecipeConfig, state: TrainState) -> int:
    """The run's steps: --max_steps, else --num_epochs of the data. Never fewer than a resumed
    run has taken: it would train past its end for ever, rotating away what it resumed from."""
    max_steps = r.max_steps or r.num_epochs * state.loader.steps_per_epoch
    if state.step > max_steps:
        asked = (f"--max_steps {r.max_steps}" if r.max_steps else
                 f"--num_epochs {r.num_epochs} ({max_steps} steps)")
        raise UserError(f"{asked} is below the checkpoint's step {state.step}: that run is "
                        f"further already; resume with --max_steps {state.step} or more")
    return max_steps


def accumulation_steps(total_batch_size: int, B: int, T: int, W: int) -> int:
    """Micro-batches per optimizer step, for --total_batch_size tokens a step, B sequences of
    T tokens a micro-batch, W processes."""
    if total_batch_size % (B * T * W):
        fits = micro_batches_that_divide(total_batch_size, T, W)
        hint = (f"--batch_size {max(b for b in fits if b <= B) if min(fits) <= B else min(fits)} "
                f"divides it (or --batch_size auto)" if fits else
                f"--total_batch_size must be a multiple of seq_len * world_size = {T * W}")
        raise UserError(f"--total_batch_size {total_batch_size} is not divisible by "
                        f"batch_size * seq_len * world_size = {B} * {T} * {W} = {B * T * W}: "
                        f"{hint}")
    return total_batch_size // (B * T * W)


def micro_batches_that_divide(total_batch_size: int, seq_len: int, world_size: int) -> list[int]:
    """The micro-batches B for which B * seq_len * world_size divides the step, largest first."""
    sequences, left = divmod(total_batch_size, seq_len * world_size)  # per process, per step
    return [] if left else [b for b in range(sequences, 0, -1) if sequences % b == 0]


@dataclass(frozen=True)
class Evaluation:
    """One of training's evaluations (gpt2.py's chapter 7 lists them): the key of log.jsonl it
    writes, which plot and the model card read, and their name for it (None: not a figure);
    the recipe flag of its schedule (steps between runs; 0: never), on which it runs, and at
    the end; its data, loaded once (None: it does not run); its score of a model, which every
    rank computes with the others (each its share, reduced alike), so that all make the same
    collectives."""
    key: str
    label: str | None
    every: str
    load: Callable  # (cfg, runtime) -> its data, or None
    score: Callable  # (model, data, cfg, runtime, stop) -> what the event gets


def load_evaluations(evaluations: list[Evaluation], cfg: TrainConfig,
                     runtime: Runtime) -> list[tuple]:
    """Each evaluation with its data (None: it does not run)."""
    return [(evaluation, evaluation.load(cfg, runtime)) for evaluation in evaluations]


def load_hellaswag(cfg: TrainConfig, runtime: Runtime):
    """HellaSwag's val examples for the training hook (None without it)."""
    logs = cfg.logs
    return evaluation_data("HellaSwag", "--hellaswag_every", cfg.recipe.hellaswag_every, runtime,
                           lambda: hellaswag.load_examples(file=logs.hellaswag_file,
                                                           limit=logs.hellaswag_limit or None))


def hellaswag_score(model: GPT, examples, cfg: TrainConfig, runtime: Runtime,
                    stop: StopSignals) -> dict:
    """HellaSwag's acc_norm; each rank scores its share."""
    return dict(hellaswag=hellaswag.evaluate(model, examples, runtime.device, rank=runtime.rank,
                                             world_size=runtime.world_size,
                                             autocast_dtype=runtime.dtype)["acc_norm"])


def load_core(cfg: TrainConfig, runtime: Runtime) -> list | None:
    """CORE's tasks for the training hook (core.py; None without it)."""
    def load():
        import core  # only when CORE is asked for
        logs = cfg.logs
        return core.load_tasks(logs.core_bundle, max_per_task=logs.core_max_per_task or None)
    return evaluation_data("CORE", "--core_every", cfg.recipe.core_every, runtime, load)


def core_score(model: GPT, tasks, cfg: TrainConfig, runtime: Runtime, stop: StopSignals) -> dict:
    """CORE and each task's centered accuracy, every rank scoring its share."""
    import core
    result = core.evaluate(model, tasks, runtime.device, rank=runtime.rank,
                           world_size=runtime.world_size, autocast_dtype=runtime.dtype)
    return dict(core=result["core"],
                core_tasks={label: r["centered"] for label, r in result["tasks"].items()})


def evaluation_data(name: str, flag: str, every: int, runtime: Runtime, load):
    """load()'s data for an evaluation in training, or None when `flag` is 0: downloaded once
    per machine (local rank 0 first), its error naming the evaluation and how to go without."""
    if not every:
        return None

    def guarded():
        try:
            return load()
        except UserError as e:
            raise UserError(f"{name} data: {e} (or train with {flag} 0)") from None
    return local_rank0_first(runtime, guarded)


# Dashboards. --tensorboard DIR and --wandb PROJECT mirror each event of log.jsonl as it is
# written, from rank 0: a training step's or an evaluation's numbers as scalars under
# log.jsonl's own names at its step, the samples as text, the config event as the run's
# configuration. log.jsonl stays the record; a mirror holds nothing it lacks. Neither package
# is a dependency: each is imported only when its flag is given, and a missing one is one line
# naming the pip command.
#
# A resumed run goes on with the same curves. Each TensorBoard writer starts with a restart
# mark at its first step (purge_step), and TensorBoard hides what earlier files hold from
# there on: what the interrupted run sent after its checkpoint, as log.jsonl forgets it (or,
# for a fresh run in a used DIR, the old run). The evaluation at the checkpoint's step, which
# log.jsonl keeps, is sent again. wandb goes on with the same run (its id kept in
# log_dir/wandb_run_id) and ignores, with a warning, the steps it already has: the same
# numbers, since resume is exact.


def check_dashboard_packages(logs: LogsConfig):
    """A dashboard's flag without its package: one line, from gpt2.validate."""
    for flag, name, wanted in (("--tensorboard", "tensorboard", logs.tensorboard),
                               ("--wandb", "wandb", logs.wandb)):
        if wanted:
            dashboard_package(flag, name)


def dashboard_package(flag: str, name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"{flag} needs the {name} package ({e}): pip install {name}") from None


class Dashboards:
    """The run's --tensorboard and --wandb mirrors of log.jsonl (none but on rank 0); `step`:
    the step the run starts at."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, step: int):
        self.tensorboard = self.wandb = self.wandb_table = None
        if not runtime.is_main:
            return
        logs = cfg.logs
        if logs.tensorboard:
            dashboard_package("--tensorboard", "tensorboard")  # torch's writer needs it
            from torch.utils.tensorboard import SummaryWriter
            try:
                self.tensorboard = SummaryWriter(logs.tensorboard, purge_step=step)
            except OSError as e:
                raise UserError(f"--tensorboard {logs.tensorboard}: cannot write there "
                                f"({e.strerror or e})") from None
            resumed_log = Path(logs.log_dir) / "log.jsonl" if step else None
            for event in read_events(logs.log_dir) if resumed_log and resumed_log.exists() else []:
                if event["step"] == step:
                    self.to_tensorboard(event)  # what purge_step hid and log.jsonl kept
        if logs.wandb:
            wandb = dashboard_package("--wandb", "wandb")
            self.wandb, self.wandb_table = self.start_wandb(wandb, cfg, step), wandb.Table

    @staticmethod
    def start_wandb(wandb, cfg: TrainConfig, step: int):
        logs = cfg.logs
        id_file = Path(logs.log_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if step and id_file.exists() else None
        try:
            run = wandb.init(project=logs.wandb, config=cfg.flags(), id=run_id,
                             resume="allow" if run_id else None,
                             dir=os.environ.get("WANDB_DIR", logs.log_dir))  # beside the log
        except wandb.Error as e:
            raise UserError(f"--wandb {logs.wandb}: {e} (or WANDB_MODE=offline)") from None
        with atomic_write(id_file) as f:
            f.write(run.id.encode())
        return run

    def write(self, event: dict):
        if self.tensorboard:
            self.to_tensorboard(event)
        if self.wandb:
            self.to_wandb(event)

    @staticmethod
    def scalars(event: dict) -> dict:
        return {k: v for k, v in event.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}

    def to_tensorboard(self, event: dict):
        step, board = event["step"], self.tensorboard
        if "config" in event:
            board.add_text("config", "```\n" + json.dumps(event, indent=1) + "\n```", step)
        else:
            for key, value in self.scalars(event).items():
                board.add_scalar(key, value, step)
            for i, text in enumerate(event.get("samples", [])):  # as written, not as Markdown
                board.add_text(f"samples/{i}", "```\n" + text + "\n```", step)
        board.flush()  # as it happens, not every two minutes

    def to_wandb(self, event: dict):
        if "config" in event:
            # allow_val_change: the event's "model" (the preset or source used) replaces the
            # flag's (None for the default)
            self.wandb.config.update({k: v for k, v in event.items() if k != "step"},
                                     allow_val_change=True)
            return
        data = self.scalars(event)
        if event.get("samples"):
            data["samples"] = self.wandb_table(columns=["sample"],
                                               data=[[text] for text in event["samples"]])
        self.wandb.log(data, step=event["step"])

    def __del__(self):  # the run's end: its EventLog is gone
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
