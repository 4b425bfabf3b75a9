"""A training run's configuration, typed: the flags of `python gpt2.py` parsed into five frozen
sections (what is trained, by which recipe, with which optimizer, on what machine, from which
data into which folder), and apart from them what the run works out for itself (Resolved:
--batch_size auto, --compile auto, --loss_chunk -1), so that the flags stay as they were given.

The flags' defaults and their reasons live where the reader meets them (gpt2.py's chapter 9 and
cli.py); here only which section each belongs to. A checkpoint stores the configuration under a
version: an older one, or one that lacks a field, is read with the running configuration's
value for what it lacks (from_saved). No torch here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

VERSION = 1  # 0: the flat dict of flags that checkpoints held before the sections


@dataclass(frozen=True)
class ModelConfig:
    """The architecture (gpt2.py's chapter 1), or --init_from's source (chapter 3)."""
    model: str | None
    n_layer: int | None
    n_head: int | None
    n_embd: int | None
    block_size: int | None
    pad_vocab_to_multiple_of: int
    dropout: float
    init_from: str | None


@dataclass(frozen=True)
class RecipeConfig:
    """The run: its batch, length, schedule and evaluations (chapter 9's flags)."""
    batch_size: int | str  # "auto": Resolved.batch_size says what it became
    seq_len: int
    total_batch_size: int
    max_steps: int
    num_epochs: int
    max_lr: float
    min_lr_ratio: float
    warmup_steps: int
    grad_clip: float
    seed: int
    eval_every: int
    val_tokens: int
    hellaswag_every: int
    core_every: int
    checkpoint_every: int
    skip_spikes: float
    skip_spikes_limit: int


@dataclass(frozen=True)
class OptimizerConfig:
    """Which optimizer (chapter 6's table) and its settings."""
    optimizer: str
    weight_decay: float
    muon_lr: float
    muon_momentum: float
    muon_weight_decay: float
    muon_qkv: str


@dataclass(frozen=True)
class MachineConfig:
    """How the run computes: the same run on other hardware changes only these."""
    device: str
    dtype: str
    compile: str  # "auto": Resolved.compile
    loss_chunk: int  # -1 (auto): Resolved.loss_chunk
    dist_timeout: float
    dist_backend: str
    fsdp: bool
    activation_checkpointing: bool
    peak_flops: float | None


@dataclass(frozen=True)
class LogsConfig:
    """Where the data comes from and where the results go: shards, evaluation files, the log
    folder and its checkpoints, dashboards, samples."""
    data_dir: str
    log_dir: str
    tensorboard: str | None
    wandb: str | None
    hellaswag_file: str | None
    hellaswag_limit: int
    core_bundle: str | None
    core_max_per_task: int
    num_samples: int
    sample_tokens: int
    sample_prompt: str
    keep_checkpoints: int
    resume: bool
    overwrite: bool


@dataclass(frozen=True)
class Resolved:
    """What the run decided for itself: the micro-batch that fits (--batch_size auto, once the
    model is built), whether it compiles and the loss's chunk (by the device). None: not yet."""
    batch_size: int | None = None
    compile: bool | None = None
    loss_chunk: int | None = None


SECTIONS = {"model": ModelConfig, "recipe": RecipeConfig, "optimizer": OptimizerConfig,
            "machine": MachineConfig, "logs": LogsConfig}
NOT_RUN_FLAGS = ("resume", "overwrite")  # how this command was started, not what the run is


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    recipe: RecipeConfig
    optimizer: OptimizerConfig
    machine: MachineConfig
    logs: LogsConfig
    resolved: Resolved = Resolved()

    @classmethod
    def from_flags(cls, flags: dict, fill: TrainConfig | None = None) -> TrainConfig:
        """From a flat {flag: value} (the parser's, or a checkpoint's): each flag into its
        section; one the dict lacks takes `fill`'s value (an error without one). Flags of no
        section are left out (an older gpt2.py's, or the parser's command name)."""
        def section(name, kind):
            known = {f.name: flags[f.name] for f in fields(kind) if f.name in flags}
            if fill is None:
                return kind(**known)
            return dataclasses.replace(getattr(fill, name), **known)
        return cls(**{name: section(name, kind) for name, kind in SECTIONS.items()})

    def flags(self) -> dict:
        """The flat {flag: value} of every section (not Resolved)."""
        return {k: v for name in SECTIONS
                for k, v in dataclasses.asdict(getattr(self, name)).items()}

    def resolve(self, **values) -> TrainConfig:
        return dataclasses.replace(self, resolved=dataclasses.replace(self.resolved, **values))

    def to_saved(self) -> dict:
        """What a checkpoint stores: the version, each section, and what was resolved."""
        return {"version": VERSION, **{name: dataclasses.asdict(getattr(self, name))
                                       for name in [*SECTIONS, "resolved"]}}

    @classmethod
    def from_saved(cls, saved: dict, fill: TrainConfig) -> TrainConfig:
        """A checkpoint's configuration, whatever its version; what it lacks is `fill`'s."""
        stored = saved.get("train_config")
        if stored is None:  # version 0: the flat flags, with resolved values written over them
            return cls.from_flags(saved.get("args") or {}, fill)
        resolved = {f.name: stored.get("resolved", {}).get(f.name) for f in fields(Resolved)}
        return dataclasses.replace(cls.from_flags(stored_flags(stored), fill),
                                   resolved=Resolved(**resolved))


def stored_flags(stored: dict) -> dict:
    """The flat flags of a saved configuration's sections."""
    return {k: v for name in SECTIONS for k, v in stored.get(name, {}).items()}


def saved_flags(saved: dict) -> dict:
    """A checkpoint's flat flags, whatever its version, with what its run resolved (--batch_size
    auto's micro-batch, ...) in place of auto, as the model card shows them; {} if none."""
    stored = saved.get("train_config")
    if stored is None:  # version 0
        return {k: v for k, v in (saved.get("args") or {}).items()
                if k not in ("command", "changed_on_resume")}
    resolved = {k: v for k, v in stored.get("resolved", {}).items() if v is not None}
    return {**stored_flags(stored), **resolved}
