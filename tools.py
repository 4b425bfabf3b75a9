"""The tools: `sample`, `hellaswag`, `export`, `bench` and `plot`, as `python gpt2.py COMMAND`.
They sit above gpt2.py and use its story's code (the model, the generator, the loader).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import hellaswag
from config import saved_flags
from plumbing import UserError, atomic_write, gpt2_tokenizer
from weights import write_safetensors
from parallel import pick_device, pick_dtype, recompute_activations, torch_version
from muon import MUON_MIN_TORCH
from checkpoints import Checkpoints, changed_on_resume
from training import datasheet_peak_flops, flops_per_token, peak_memory_mib, read_events, rusage
from gpt2 import (CONV1D_WEIGHTS, EOT, GPT, Runtime, ShardedDataLoader, VOCAB_SIZE,
                  all_evaluations, speed_settings, autocast_context, checkpoint_model,
                  configure_optimizer, enable_tf32, generate, load_checkpoint_model,
                  load_pretrained, model_config, setup_distributed)


# An export is a folder the Hugging Face tools take as they take OpenAI's gpt2: the weights
# (above), GPT-2's tokenizer in transformers' files, the generation defaults, and a model card
# that says what made the model. The tokenizer's vocab.json and merges.txt are rebuilt from
# tiktoken's encoding, the one we train with, and come out byte for byte the files OpenAI
# published (encoder.json and vocab.bpe, which the hub serves under those names): a test
# checks their sha256. No new dependency, and no download.


def tool_runtime(device_flag: str, dtype_flag: str = "auto") -> Runtime:
    """One process's device and precision for the tools: bf16 autocast and TF32 where they
    pay, as in training; --device cuda:N made the current GPU (else a library's plain "cuda"
    would open a second context on GPU 0)."""
    device = pick_device(device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    enable_tf32(device)
    return Runtime(device=device, dtype=pick_dtype(dtype_flag, device))


def load_model(args, device) -> GPT:
    """--checkpoint PATH (trained here) or --model NAME_OR_FOLDER (OpenAI's weights)."""
    model = load_checkpoint_model(args.checkpoint) if args.checkpoint else load_pretrained(args.model)
    return model.to(device).eval()


def sample(args):
    """python gpt2.py sample: continue a prompt with OpenAI's GPT-2 or a checkpoint."""
    runtime = tool_runtime(args.device)
    device = runtime.device
    model = load_model(args, device)
    enc = gpt2_tokenizer()
    # user text is plain text, "<|endoftext|>" too; an empty prompt starts a fresh document
    prompt = enc.encode_ordinary(args.prompt) or [EOT]
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    with autocast_context(runtime):
        out = generate(model, idx, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       use_cache=not args.no_cache)
    dt = time.perf_counter() - t0
    for row in out.tolist():
        print("-" * 80)
        print(enc.decode([t for t in row if t != EOT]))
    print("-" * 80)
    print(f"{args.num_samples} x {args.max_new_tokens} tokens in {dt:.2f} s "
          f"({args.num_samples * args.max_new_tokens / dt:.1f} tokens/s)", file=sys.stderr)


def hellaswag_command(args):
    """python gpt2.py hellaswag (or python hellaswag.py): score a model on HellaSwag."""
    # The data first: a bad file should fail before minutes of downloading weights.
    examples = hellaswag.load_examples(args.split, args.file, args.limit, base_url=args.base_url)
    # Training's precision: bf16 autocast on GPUs that have it, fp16 on older ones, float32
    # elsewhere. Half precision rounds the losses, so an ending that ties another to three
    # digits may flip: expect a score within a few examples of the float32 one.
    runtime = tool_runtime(args.device)
    device = runtime.device
    model = load_model(args, device)
    start = time.perf_counter()
    result = hellaswag.evaluate(model, examples, device, batch_size=args.batch_size,
                                autocast_dtype=runtime.dtype, progress=True)
    elapsed = time.perf_counter() - start
    print(f"acc      {result['acc']:.4f}  ({result['correct']}/{result['n']})")
    print(f"acc_norm {result['acc_norm']:.4f}  ({result['correct_norm']}/{result['n']})")
    print(f"n        {result['n']}")
    print(f"elapsed  {elapsed:.1f} s  ({result['n'] / elapsed:.1f} examples/s on {device})")


def save_pretrained(model: GPT, path):
    """Write config.json + model.safetensors as transformers' GPT2LMHeadModel expects them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    hf_config = dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="gelu_new",
        n_positions=c.block_size, n_ctx=c.block_size, vocab_size=c.vocab_size,
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_inner=None,
        layer_norm_epsilon=1e-5, initializer_range=0.02, bos_token_id=EOT, eos_token_id=EOT,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        tie_word_embeddings=True,
        # the weights' own dtype; without it transformers guesses, and says so
        dtype=str(model.transformer.wte.weight.dtype).removeprefix("torch."))
    with atomic_write(path / "config.json") as f:
        f.write(json.dumps(hf_config, indent=2).encode())
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte
        if name == "transformer.wte.weight":
            t = t[:c.vocab_size]  # padding rows are ours alone
        tensors[name] = t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t
    write_safetensors(path / "model.safetensors", tensors)


def byte_characters() -> list[str]:
    """The character that stands for each byte in GPT-2's files (OpenAI's bytes_to_unicode):
    the 188 printable bytes stand for themselves; the other 68 (space, control codes, ...)
    would be invisible or mangled in a text file, so they take U+0100 onwards, in order."""
    shown = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    moved = {b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in shown)}
    return [moved.get(b, chr(b)) for b in range(256)]


def merged_from(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """The two tokens whose merge made `token`: where BPE stops on its bytes with only the
    merges made before it."""
    splits = [[token[:i], token[i:]] for i in range(1, len(token))
              if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
    if len(splits) == 1:
        return splits[0]  # the only candidate: true of 45% of the tokens, and 4x faster
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:  # BPE: merge the pair made earliest, again and again
        i = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.cache  # ~2 s of Python: made once per process, however many exports it writes
def bpe_files() -> tuple[bytes, bytes]:
    """vocab.json and merges.txt, rebuilt from tiktoken's encoding. Token r >= 256 of it was
    made by merge r - 256 of merges.txt."""
    enc = gpt2_tokenizer()
    chars = byte_characters()
    text = lambda token: "".join(chars[b] for b in token)  # noqa: E731
    ranks = {enc.decode_single_token_bytes(r): r for r in range(EOT)}
    merges = [" ".join(map(text, merged_from(t, r, ranks))) for t, r in ranks.items() if len(t) > 1]
    vocab = {text(t): r for t, r in ranks.items()} | {"<|endoftext|>": EOT}
    return (json.dumps(vocab).encode(),  # OpenAI's layout, to the byte
            ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())


def tokenizer_files(block_size: int) -> dict[str, bytes]:
    """GPT-2's tokenizer as transformers' GPT2Tokenizer reads it, for contexts of block_size."""
    vocab, merges = bpe_files()
    special = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                   unk_token="<|endoftext|>")
    # Transformers' GPT-2 defaults, written out: older releases tidy " ," into "," when they
    # decode (clean_up_tokenization_spaces), and decode(encode(text)) must give back the text.
    # split_special_tokens: "<|endoftext|>" in text is plain text, as everywhere in this project
    config = dict(tokenizer_class="GPT2Tokenizer", model_max_length=block_size,
                  add_prefix_space=False, add_bos_token=False, errors="replace",
                  clean_up_tokenization_spaces=False, split_special_tokens=True, **special)
    as_json = lambda d: json.dumps(d, indent=2).encode()  # noqa: E731
    return {"vocab.json": vocab, "merges.txt": merges,
            "tokenizer_config.json": as_json(config),
            "special_tokens_map.json": as_json(special),
            "generation_config.json": as_json(dict(bos_token_id=EOT, eos_token_id=EOT))}


def data_description(data_dir) -> str:
    """What the shards in data_dir were made from, as far as fineweb.py's manifest says."""
    from fineweb import read_manifest  # only an export asks
    source = None
    with contextlib.suppress(UserError, OSError):  # a folder elsewhere, or not fineweb.py's
        source = (read_manifest(data_dir) or {}).get("params", {}).get("source")
    if source and "name" in source:
        return f"`{data_dir}`: FineWeb-Edu {source['name']}, tokenized by fineweb.py"
    if source and "input" in source:
        files = ", ".join(f"`{p}`" for p in source["input"])
        return f"`{data_dir}`: {files}, tokenized by fineweb.py"
    return f"`{data_dir}` (what it was made from: unknown)"


def model_card(model: GPT, saved: dict, checkpoint: Path, name: str) -> str:
    """README.md of an export: what made the model, on what data, how far it trained and how
    well it did, from the checkpoint and the run's log.jsonl beside it (when it is there)."""
    c, flags, step = model.config, saved_flags(saved), saved.get("step")
    params = model.num_params() - (c.padded_vocab_size - c.vocab_size) * c.n_embd  # as exported
    log = checkpoint.parent / "log.jsonl"
    events = read_events(log.parent) if log.exists() and step is not None else []

    def newest(key):  # the newest figure of these weights or earlier ones, never later ones
        found = [e for e in events if key in e and e["step"] <= step]
        return (f"{found[-1][key]:.4f} at step {found[-1]['step']:,}" if found else
                f"unknown ({log.name} beside the checkpoint has none)" if events else
                f"unknown (no {log.name} beside the checkpoint)")

    start = (f"fine-tuned from `{flags['init_from']}`" if flags.get("init_from") else
             "trained from random weights" if flags else "trained")
    steps = "unknown" if step is None else f"{step:,}" + (
        f" ({step * flags['total_batch_size']:,} tokens)" if "total_batch_size" in flags else "")
    limit, rows = flags.get("hellaswag_limit"), flags.get("hellaswag_file") or "its val split"
    rows = (f"the first {limit:,} rows of {rows}" if limit else
            f"all of {rows}" if flags.get("hellaswag_file") else "its 10,042 val rows")
    data = data_description(flags["data_dir"]) if flags.get("data_dir") else "unknown"
    changes = changed_on_resume(saved)  # each resume's other flags
    shown = {**flags, **({"changed_on_resume": changes} if changes else {})}
    detail = {"hellaswag": f" (completion style, {rows})"}
    figures = [f"- {e.label}{detail.get(e.key, '')}: {newest(e.key)}" for e in all_evaluations()
               if e.label and flags.get(e.every, 1)]  # those the run had (all: flags unknown)
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags:", "- gpt2", "- gpt2.py",
        *(["datasets:", "- HuggingFaceFW/fineweb-edu"] if "FineWeb-Edu" in data else []),
        "---", "", f"# {name}", "",
        f"A GPT-2 language model {start} with gpt2.py, a from-scratch GPT-2 reproduction in "
        f"PyTorch, and exported from `{checkpoint.name}` by `python gpt2.py export`.", "",
        f"- Architecture: GPT-2, {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, a "
        f"{c.block_size:,}-token context, {params:,} parameters; GPT-2's tokenizer "
        f"({c.vocab_size:,} tokens)",
        f"- Data: {data}",
        f"- Steps: {steps}",
        *figures, "",
        "## Use", "", "```python", "from transformers import pipeline", "",
        f'generate = pipeline("text-generation", model="{name}")',
        'print(generate("Hello, I\'m a language model,", max_new_tokens=32)[0]["generated_text"])',
        "```", "", "Benchmarks, with EleutherAI's lm-evaluation-harness:", "", "```",
        f"lm_eval --model hf --model_args pretrained={name} "
        "--tasks hellaswag,arc_easy,piqa,lambada_openai,winogrande --batch_size 16", "```", "",
        "## Training flags", "", "```json", json.dumps(shown, indent=1) if shown else "unknown",
        "```", ""])


@contextlib.contextmanager
def export_folder(out: Path):
    """A new folder beside `out` to write the export into, renamed onto `out` once complete: a
    full disk or a kill leaves the old export (or none), never half of one. An `out` that
    exists (holding only files of export's names: checked) is moved aside, then deleted."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror})") from None
    part = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    part.mkdir()
    try:
        yield part
        old = part.with_suffix(".old") if out.exists() else None
        if old:
            os.replace(out, old)
        os.replace(part, out)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def export(args):
    """python gpt2.py export: a checkpoint of ours as a Hugging Face GPT-2 folder: the weights,
    the tokenizer, the generation defaults and a model card."""
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    saved = Checkpoints.load(checkpoint, for_training=False)  # its step and flags: the card's
    model = checkpoint_model(saved)
    files = tokenizer_files(model.config.block_size)  # offline without tiktoken's files: stop here
    files["README.md"] = model_card(model, saved, checkpoint, out.resolve().name).encode()
    # A folder with other files (an old tokenizer.json, pytorch_model.bin) would be read by
    # transformers before ours: refused, and nothing of it deleted.
    ours = {"config.json", "model.safetensors", *files}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if others:
        raise UserError(f"--out {out} holds files export does not write ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}), which transformers would read "
                        f"instead of ours: give an empty or new folder")
    with export_folder(out) as folder:
        save_pretrained(model, folder)
        for name, data in files.items():
            with atomic_write(folder / name) as f:
                f.write(data)
    print(f"wrote {out}: transformers.pipeline('text-generation', model={str(out)!r}); "
          f"also gpt2.py sample --model {out}")


# `bench` measures, in one process, everything that decides how fast training goes: the
# device's own matmul speed (the ceiling), one training step split into its parts, generation
# with and without the cache, the loader, and peak memory. MFU is the model's FLOPs per second
# over that ceiling. Medians over repetitions, with the spread, since shared machines are noisy.


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device) -> float:
    """Seconds fn() takes, waiting for the GPU to finish its queued work."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def measure(fn, device, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    return [timed(fn, device) for _ in range(reps)]


def matmul_peak_flops(device, dtype, reps: int) -> float:
    """FLOP/s of a large square matmul in the training dtype: what this device can do at best."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / float(np.median(measure(lambda: a @ b, device, reps)))


def bench_train_step(model, train_model, optimizer, args, runtime) -> tuple[dict, float]:
    """Seconds of forward, backward and optimizer, per repetition, on random tokens; and the
    page faults per step."""
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, VOCAB_SIZE, (B, T), device=runtime.device)
    y = torch.randint(0, VOCAB_SIZE, (B, T), device=runtime.device)
    parts = {"forward": [], "backward": [], "optimizer": []}
    loss = None

    def forward():
        nonlocal loss
        with autocast_context(runtime):
            _, loss = train_model(x, y, loss_chunk=args.loss_chunk)

    for rep in range(args.warmup + args.reps):
        if rep == args.warmup:
            faults = page_faults()
        times = [timed(forward, runtime.device), timed(lambda: loss.backward(), runtime.device),
                 timed(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)),
                       runtime.device)]
        if rep >= args.warmup:
            for name, t in zip(parts, times):
                parts[name].append(t)
    # Minor page faults per step: memory the allocator gave back to the OS and takes again.
    return parts, (page_faults() - faults) / args.reps


def kept_for_backward_mib(model: GPT, forward) -> float:
    """MiB of the tensors one forward pass keeps for the backward pass, the weights left out:
    the activations, which --activation_checkpointing trades for a second forward."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()  # views of one storage count once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values()) / 2 ** 20


def page_faults() -> int:
    """This process's page faults so far (0 where getrusage does not exist: Windows)."""
    usage = rusage()
    return usage.ru_minflt if usage else 0


# The generation cases `bench` times: batch 1 and 8, greedy and top-k 50 (Hugging Face's default).
GEN_CASES = {"b1_greedy": (1, dict(temperature=0)), "b1_topk": (1, dict(top_k=50)),
             "b8_greedy": (8, dict(temperature=0)), "b8_topk": (8, dict(top_k=50))}


def bench_generation(generate_fn, runtime: Runtime, batch: int, new_tokens: int, reps: int):
    """Tokens/s of generate_fn(idx) for `batch` random 16-token prompts."""
    idx = torch.randint(0, VOCAB_SIZE, (batch, 16), device=runtime.device)
    times = measure(lambda: generate_fn(idx), runtime.device, reps, warmup=1)
    return [batch * new_tokens / t for t in times]


def transformers_twin(model: GPT, runtime: Runtime):
    """The same weights in transformers' GPT2LMHeadModel (for comparison; transformers is a
    test-only dependency, imported only for --vs_transformers)."""
    import tempfile

    import transformers
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        return transformers.GPT2LMHeadModel.from_pretrained(tmp).to(runtime.device).eval()


def generation_speeds(model: GPT, hf, runtime: Runtime, new_tokens: int, reps: int) -> dict:
    """{case: tokens/s} for ours (cached), ours without the cache, and transformers' cached
    generate on the same weights if hf is given; the cases of GEN_CASES."""
    speeds = {}
    for case, (batch, sampling) in GEN_CASES.items():
        speeds[f"gen_{case}"] = bench_generation(
            lambda idx: generate(model, idx, new_tokens, seed=0, **sampling), runtime, batch,
            new_tokens, reps)
        if hf is not None:
            hf_sampling = (dict(do_sample=False) if sampling.get("temperature") == 0
                           else dict(do_sample=True, top_k=sampling["top_k"]))
            speeds[f"gen_{case}_transformers"] = bench_generation(
                lambda idx: hf.generate(idx, attention_mask=torch.ones_like(idx),
                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        pad_token_id=EOT, **hf_sampling),
                runtime, batch, new_tokens, reps)
    speeds["gen_b1_topk_nocache"] = bench_generation(
        lambda idx: generate(model, idx, new_tokens, top_k=50, seed=0, use_cache=False),
        runtime, 1, new_tokens, reps)
    return speeds


def read_bandwidth(device: torch.device, reps: int) -> float:
    """Bytes/s this device reads: the sum of a 256 MB tensor. Generating one token at batch 1
    reads every weight once, so weight bytes / this is the fastest a token can come."""
    a = torch.ones(64 * 2 ** 20, device=device)  # 256 MB of float32
    return a.numel() * 4 / float(np.median(measure(lambda: a.sum(), device, reps)))


def hellaswag_speed(model: GPT, runtime: Runtime, n: int, reps: int) -> list[float]:
    """Examples/s of HellaSwag scoring, on the first n of the repository's 1,000 val rows."""
    examples = hellaswag.load_examples(file=Path(__file__).parent / "samples" /
                                       "hellaswag_val_1000.jsonl", limit=n)
    hellaswag.examples_per_second(model, examples[:4], runtime.device)  # warm-up
    return [hellaswag.examples_per_second(model, examples, runtime.device) for _ in range(reps)]


def core_speed(model: GPT, runtime: Runtime, n: int, reps: int) -> list[float]:
    """Examples/s of CORE scoring (core.py) on a task like CORE's hellaswag, its largest in
    tokens: the first n of the repository's 1,000 HellaSwag val rows, multiple choice, 10-shot."""
    import core
    rows = hellaswag.load_examples(file=Path(__file__).parent / "samples" /
                                   "hellaswag_val_1000.jsonl", limit=max(n, 11))
    examples = [dict(query=r["ctx"], choices=r["endings"], gold=r["label"]) for r in rows]
    task = core.Task("hellaswag", "multiple_choice", 10, " ", 25.0, examples, [""] * len(rows))
    core.examples_per_second(model, [task._replace(examples=examples[:11])], runtime.device,
                             autocast_dtype=runtime.dtype)  # warm-up
    return [core.examples_per_second(model, [task], runtime.device, autocast_dtype=runtime.dtype)
            for _ in range(reps)]


def bench_loader(reps: int, B: int = 64, T: int = 1024, shard_tokens: int = 16_000_000) -> list[float]:
    """Batches/s the loader serves at training's default B=64, T=1024: random windows of a
    32 MB shard (in the page cache, as a shard in use is). One batch must stay well under 1%
    of a GPU step (~100 ms for the 124M model on an H100)."""
    import tempfile

    import fineweb  # the shard writer (no torch inside: cheap to import)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_train_000001.bin"
        tokens = np.random.default_rng(0).integers(0, VOCAB_SIZE, shard_tokens, dtype=np.uint16)
        fineweb.write_shard(path, tokens)
        loader = ShardedDataLoader([path], B, T)
        n = 100
        return [n / t for t in measure(lambda: [loader.next_windows() for _ in range(n)],
                                       torch.device("cpu"), reps)]


def spread(values: list[float]) -> str:
    return f"{np.median(values):,.3f} (min {min(values):,.3f}, max {max(values):,.3f})"


def bench_training(model: GPT, args, runtime: Runtime) -> tuple[dict, list]:
    """The training step's figures: (results, table rows)."""
    optimizer = configure_optimizer(model, 1e-4, 0.1)
    if args.activation_checkpointing:
        recompute_activations(model)
    train_model = torch.compile(model) if args.compile == "on" else model
    peak = matmul_peak_flops(runtime.device, runtime.dtype, args.reps)
    parts, faults = bench_train_step(model, train_model, optimizer, args, runtime)
    x = torch.randint(0, VOCAB_SIZE, (args.batch_size, args.seq_len + 1), device=runtime.device)

    def forward():
        with autocast_context(runtime):
            return model(x[:, :-1], x[:, 1:], loss_chunk=args.loss_chunk)[1]

    kept = kept_for_backward_mib(model, forward)  # eager: what compiled code keeps is its own
    step = [sum(ts) for ts in zip(*parts.values())]
    tok_s = [args.batch_size * args.seq_len / t for t in step]
    flops = flops_per_token(model.config, args.seq_len)
    result = dict(device=str(runtime.device), dtype=str(runtime.dtype).removeprefix("torch."),
                  params=model.num_params(), batch_size=args.batch_size, seq_len=args.seq_len,
                  train_tok_s=float(np.median(tok_s)), peak_flops=peak,
                  mfu=flops * float(np.median(tok_s)) / peak)
    rows = [("device", f"{runtime.device} ({result['dtype']}), torch {torch.__version__}"),
            ("model", f"{result['params']:,} parameters, {flops / 1e6:,.1f} MFLOP/token"),
            ("matmul peak", f"{peak / 1e9:,.1f} GFLOP/s"),
            *[(f"{name} (s)", spread(ts)) for name, ts in parts.items()],
            ("train step (s)", spread(step)), ("train tokens/s", spread(tok_s)),
            ("MFU (of measured peak)", f"{100 * result['mfu']:.1f}%"),
            ("page faults per step", f"{faults:,.0f}"),
            ("kept for backward, weights aside (MiB)", f"{kept:,.1f}")]
    result["page_faults_per_step"], result["kept_for_backward_mib"] = faults, kept
    datasheet = datasheet_peak_flops(runtime.device, runtime.dtype)
    if datasheet:
        result["mfu_datasheet"] = flops * result["train_tok_s"] / datasheet
        rows.append(("MFU (of datasheet)", f"{100 * result['mfu_datasheet']:.1f}%"))
    for name, seconds in optimizer_step_times(model, runtime, args.reps).items():
        result[f"opt_step_{name}_s"] = float(np.median(seconds))
        rows.append((f"optimizer step, {name} (s)", spread(seconds)))
    return result, rows


def optimizer_step_times(model: GPT, runtime: Runtime, reps: int) -> dict[str, list[float]]:
    """Seconds of one optimizer step, AdamW alone and Muon (the blocks' matrices) + AdamW, on
    the same random gradients, one after the other in this process; over several processes
    (bench under torchrun) also Muon shared over them. On a CPU also the Muon steps' CPU
    seconds in Newton-Schulz (`..._newton_schulz_cpu`), this process's share of the work. (The
    weights move a little: what bench measures after this is speed, which does not depend on
    them.)"""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {"adamw": configure_optimizer(model, 1e-4, 0.1)}
    if torch_version() >= MUON_MIN_TORCH:
        muon = dict(muon_lr=0.02, momentum=0.95, weight_decay=0.0, split_qkv=True)
        optimizers["muon"] = configure_optimizer(model, 1e-4, 0.1, {**muon, "share": False})
        if runtime.world_size > 1:
            optimizers[f"muon_shared_over_{runtime.world_size}"] = configure_optimizer(
                model, 1e-4, 0.1, muon)
    times = {}
    for name, optimizer in optimizers.items():
        newton_schulz_s = []

        def step():
            optimizer.step()
            newton_schulz_s.append(getattr(optimizer, "orthogonalize_s", None))

        times[name] = measure(step, runtime.device, reps)
        if name != "adamw" and runtime.device.type == "cpu":
            times[f"{name}_newton_schulz_cpu"] = newton_schulz_s[-reps:]
    return times


def bench_optimizer_per_process(args):
    """`bench` under torchrun: the optimizer step alone, timed in every process at once (the
    rest of bench is one process's business): each rank's medians, printed by rank 0."""
    runtime = setup_distributed(args.device, args.dtype, backend=args.dist_backend)
    torch.manual_seed(0)  # the same weights and gradients in every process
    model = GPT(model_config(args)).to(runtime.device)
    medians = {k: float(np.median(v)) for k, v in optimizer_step_times(model, runtime, args.reps).items()}
    every = [None] * runtime.world_size
    dist.all_gather_object(every, medians)
    result = {f"opt_step_{k}_s": [m[k] for m in every] for k in medians}
    rows = [(f"optimizer step, {k} (s), rank 0 .. {runtime.world_size - 1}",
             " / ".join(f"{m[k]:.3f}" for m in every)) for k in medians]
    if runtime.is_main:
        print_bench(rows, result)
    dist.destroy_process_group()


def bench_inference(model: GPT, args, runtime: Runtime) -> tuple[dict, list]:
    """Generation, against transformers and the memory-bandwidth limit, and HellaSwag."""
    hf = transformers_twin(model, runtime) if args.vs_transformers else None
    speeds = generation_speeds(model, hf, runtime, args.gen_tokens, args.reps)
    bandwidth = read_bandwidth(runtime.device, args.reps)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hella = hellaswag_speed(model, runtime, args.hellaswag_examples, min(args.reps, 3))
    cores = core_speed(model, runtime, args.core_examples, min(args.reps, 3))
    result = {k: float(np.median(v)) for k, v in speeds.items()}
    result.update(gen_tok_s_cache=result["gen_b1_topk"],  # short names: batch-1 top-k
                  gen_tok_s_nocache=result["gen_b1_topk_nocache"],
                  read_bandwidth=bandwidth, gen_b1_limit=bandwidth / weight_bytes,
                  hellaswag_examples_s=float(np.median(hella)),
                  core_examples_s=float(np.median(cores)))
    if hf is not None:
        result["gen_tok_s_transformers"] = result["gen_b1_topk_transformers"]
    rows = [(f"generate 16+{args.gen_tokens}, {k.removeprefix('gen_')} (tok/s)", spread(v))
            for k, v in speeds.items()]
    rows += [("read bandwidth (GB/s)", f"{bandwidth / 1e9:,.1f}"),
             ("batch-1 limit: bandwidth / weight bytes (tok/s)", f"{result['gen_b1_limit']:,.1f}"),
             ("HellaSwag (examples/s)", spread(hella)),
             ("HellaSwag, all 10,042 val examples (min)",
              f"{10042 / result['hellaswag_examples_s'] / 60:,.1f}"),
             ("CORE, hellaswag 10-shot rows (examples/s)", spread(cores))]
    return result, rows


def bench(args):
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return bench_optimizer_per_process(args)
    runtime = tool_runtime(args.device, args.dtype)
    device = runtime.device
    speed = speed_settings(args.compile, args.loss_chunk, device)  # bench's flags, as run
    args = argparse.Namespace(**{**vars(args), "compile": "on" if speed["compile"] else "off",
                                 "loss_chunk": speed["loss_chunk"]})
    torch.manual_seed(0)
    model = GPT(model_config(args)).to(device)
    result, rows = bench_training(model, args, runtime)
    if not args.train_only:
        model.eval()
        more, more_rows = bench_inference(model, args, runtime)
        loader = bench_loader(args.reps)
        result.update(more, loader_batches_s=float(np.median(loader)))
        rows += [*more_rows, ("loader, B=64 T=1024 (batches/s)", spread(loader))]
    peak = peak_memory_mib(device)
    result.update(peak)
    rows += [(k.replace("_", " "), f"{v:,.0f}") for k, v in peak.items() if v is not None]
    print_bench(rows, result)


def print_bench(rows: list, result: dict):
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps(result))


# `plot` draws a run's log.jsonl: the training loss and each evaluation's figure (chapter 7's
# list: its key and name), losses on the left, scores (accuracies, CORE) on the right, against
# steps and tokens. For the 124M model it adds OpenAI GPT-2 124M's own figures as reference
# lines: val loss 3.2924 on the FineWeb-Edu val shard (measured by build-nanogpt), HellaSwag
# acc_norm 0.2955 (completion style, all 10,042 examples; build-nanogpt and llm.c), and CORE
# 0.1139 (nanochat's dev/estimate_gpt3_core.ipynb, from its base_eval.py on OpenAI's weights).
GPT2_124M = {"val_loss": 3.2924, "hellaswag": 0.2955, "core": 0.1139}
CHANCE = {"hellaswag": 0.25}  # four endings; CORE is centered: 0 is chance


def plot(args):
    import matplotlib  # imported here only: training does not need it
    matplotlib.use("Agg")  # files, no window
    import matplotlib.pyplot as plt

    events = read_events(args.log_dir)
    run = next((e for e in events if "config" in e), {})
    is_124m = run.get("config", {}).get("n_embd") == 768 and run["config"].get("n_layer") == 12
    tokens_per_step = run.get("total_batch_size")
    train = [(e["step"], e["loss"]) for e in events if "loss" in e]
    if not train:
        raise UserError(f"{args.log_dir}/log.jsonl has no training steps yet")
    series = {e: [(v["step"], v[e.key]) for v in events if isinstance(v.get(e.key), (int, float))]
              for e in all_evaluations() if e.label}
    losses = {e: points for e, points in series.items() if points and e.key.endswith("loss")}
    scores = {e: points for e, points in series.items() if points and not e.key.endswith("loss")}
    two = bool(scores)
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(13 if two else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="train loss")
    for panel, drawn in ((ax, losses), (axes[0][-1], scores)):
        for e, points in drawn.items():
            line, = panel.plot(*zip(*points), "o-", ms=3, label=e.label)
            if e.key in CHANCE:
                panel.axhline(CHANCE[e.key], color="gray", ls=":", label=f"{e.label}: chance")
            if is_124m and e.key in GPT2_124M:
                panel.axhline(GPT2_124M[e.key], color=line.get_color(), ls="--",
                              label=f"OpenAI GPT-2 124M {e.label}")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=f"{run.get('model', '')} loss")
    ax.set_ylim(top=min(11.5, max(l for _, l in train) + 0.2))
    if scores:
        axes[0][1].set(xlabel="step", ylabel="score",
                       title=" and ".join(e.label for e in scores))
    for a in fig.axes:
        a.grid(alpha=0.3)
        a.legend()
        if tokens_per_step:  # a second x-axis in tokens: comparable across batch sizes
            top = a.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / 1e6,
                                                      lambda t: t * 1e6 / tokens_per_step))
            top.set_xlabel("tokens (millions)")
    fig.tight_layout()
    out = Path(args.out or Path(args.log_dir) / "loss.png")
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=120)
    print(f"wrote {out}")
