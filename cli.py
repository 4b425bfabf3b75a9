"""The command line: `python gpt2.py [COMMAND] [FLAGS]`, train (the default), sample,
hellaswag, export, bench, plot. The flags parse here; the training run's hyperparameters are
gpt2.py's chapter 9 recipe (add_recipe_flags), the machine's and the other commands' are here.
"""
from __future__ import annotations

import argparse
import signal
import sys

import hellaswag
from config import TrainConfig
from plumbing import (HelpFormatter, Parser, UserError, float_at_least_0, int_at_least,
                      open_fraction, os_error_line, positive_float)
from parallel import DTYPES, Stopped
from gpt2 import HUB_MODELS, add_model_flags, add_recipe_flags, train
from tools import bench, export, hellaswag_command, plot, sample


MAX_NEW_TOKENS = 100_000  # generation's bound: its output alone is 8 bytes a token a sample


def add_device_flags(p):
    p.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")


def add_compile_flag(p):
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the training forward/backward: auto = on for CUDA (~2x "
                        "faster: the video's 300 -> 130 ms/step), off elsewhere; "
                        "`--compile` alone = on")


def train_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt2.py", formatter_class=HelpFormatter,
        description="Train GPT-2 (the default command). Other commands: "
                    "`gpt2.py sample --help`, `gpt2.py hellaswag --help`, `gpt2.py export "
                    "--help`, `gpt2.py bench --help`, `gpt2.py plot --help`.")
    add_recipe_flags(p)  # chapter 9
    p.add_argument("--init_from", metavar="SOURCE",
                   help="start from pretrained weights (chapter 3): gpt2 ... gpt2-xl, a "
                        "save_pretrained folder or a ckpt_*.pt of ours, with their architecture "
                        "and a fresh optimizer and schedule; to fine-tune (README): --max_lr "
                        "3e-5 --warmup_steps 0 --dropout 0.1")
    g = p.add_argument_group("data, evaluation, logs and checkpoints")
    g.add_argument("--data_dir", default="data/fineweb_edu",
                   help="folder of token shards written by fineweb.py")
    g.add_argument("--log_dir", default="log", help="log.jsonl and checkpoints go here")
    g.add_argument("--tensorboard", metavar="DIR",
                   help="also write each event of log.jsonl to TensorBoard files in DIR "
                        "(pip install tensorboard)")
    g.add_argument("--wandb", metavar="PROJECT",
                   help="also send each event of log.jsonl to this Weights & Biases project "
                        "(pip install wandb; wandb login, or WANDB_MODE=offline)")
    g.add_argument("--hellaswag_file", help="local HellaSwag jsonl (default: download val)")
    g.add_argument("--hellaswag_limit", type=int_at_least(0), default=0,
                   help="score only the first N examples (0 = all 10,042)")
    g.add_argument("--core_bundle", metavar="PATH", help="CORE's eval bundle, a folder or "
                   "eval_bundle.zip (default: download nanochat's once)")
    g.add_argument("--core_max_per_task", type=int_at_least(0), default=500,
                   help="CORE examples per task (nanochat's training default; 0 = all)")
    g.add_argument("--num_samples", type=int_at_least(0), default=4, help="samples printed at each eval")
    g.add_argument("--sample_tokens", type=int_at_least(1, MAX_NEW_TOKENS), default=32,
                   help="tokens per sample")
    g.add_argument("--sample_prompt", default="Hello, I'm a language model,",
                   help="prompt of the samples (build-nanogpt's)")
    g.add_argument("--keep_checkpoints", type=int_at_least(1), default=2,
                   help="newest checkpoints kept (a 124M one is 1.5 GB with the optimizer)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --log_dir")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --log_dir that holds a run: deletes its log.jsonl "
                        "and checkpoints (without it, such a folder is refused)")
    g = p.add_argument_group("the machine")
    add_device_flags(g)
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 autocast on GPUs that have it, float16 + loss scaling "
                        "on older GPUs, float32 on CPU and mps")
    add_compile_flag(g)
    g.add_argument("--loss_chunk", type=int_at_least(-1), default=-1,
                   help="rows per chunk of the fused loss (0 = plain cross-entropy over full "
                        "logits; -1 = auto: 256 on CPU, where it is faster and uses less memory, "
                        "0 on GPUs)")
    g.add_argument("--dist_timeout", type=positive_float, default=3600,
                   help="seconds a rank waits for the others in a collective: rank 0 writing a "
                        "gpt2-xl checkpoint (19 GB) can outlast NCCL's default 10 minutes")
    g.add_argument("--skip_spikes", type=float_at_least_0, default=0, metavar="Z",
                   help="skip an update whose loss or gradient norm is more than Z standard "
                        "deviations above the mean of the last 128 steps' (after 32 steps of "
                        "them; training.py); 0: never")
    g.add_argument("--skip_spikes_limit", type=int_at_least(1), default=5, metavar="K",
                   help="stop after K updates in a row skipped: the run, not a batch, changed")
    g.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and AdamW's moments over the GPUs (FSDP2, "
                        "ZeRO-3): for gpt2-large and -xl on GPUs that cannot hold 16 bytes a "
                        "parameter; torch >= 2.6; needs a --batch_size")
    g.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass instead of "
                        "keeping them: less memory, ~20-30%% more compute")
    g.add_argument("--dist_backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="auto: nccl between GPUs, gloo between CPU processes; gloo also lets "
                        "several processes share one GPU (as the GPU tests do)")
    g.add_argument("--peak_flops", type=positive_float,
                   help="peak FLOP/s for MFU (default: the datasheet of known GPUs)")
    return p


def add_model_source_flags(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="gpt2",
                     help=f"OpenAI weights ({', '.join(HUB_MODELS)}) or a save_pretrained folder")
    src.add_argument("--checkpoint", help="a checkpoint written by training (ckpt_*.pt)")


def sample_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpt2.py sample",
                                formatter_class=HelpFormatter,
                                description="Sample text from OpenAI's GPT-2 or a checkpoint.")
    add_model_source_flags(p)
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    p.add_argument("--num_samples", type=int_at_least(1), default=4, help="continuations, batched")
    p.add_argument("--max_new_tokens", type=int_at_least(1, MAX_NEW_TOKENS), default=64,
                   help=f"tokens to add to each, at most {MAX_NEW_TOKENS:,}: past the model's "
                        f"context each sees only the last block_size tokens, and each costs a "
                        f"full forward pass")
    p.add_argument("--temperature", type=float_at_least_0, default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=int_at_least(1), default=50,
                   help="sample among the k likeliest tokens (50: Hugging Face's default; "
                        "OpenAI's published samples used 40)")
    p.add_argument("--top_p", type=open_fraction, help="nucleus sampling threshold (default off)")
    p.add_argument("--seed", type=int_at_least(0), help="makes the samples reproducible (default random)")
    p.add_argument("--no_cache", action="store_true", help="recompute the prefix every token")
    add_device_flags(p)
    return p


def hellaswag_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt2.py hellaswag", formatter_class=HelpFormatter,
        description="Score a GPT-2 model on HellaSwag (completion style, as build-nanogpt and "
                    "llm.c do). Prints acc, acc_norm, n, elapsed time and examples/s. "
                    "`python hellaswag.py` is the same command.")
    add_model_source_flags(p)
    hellaswag.add_data_flags(p)
    add_device_flags(p)
    return p


def export_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpt2.py export",
                                formatter_class=HelpFormatter,
                                description="Write a checkpoint as a Hugging Face GPT-2 folder: "
                                            "config.json + model.safetensors (the vocabulary "
                                            "unpadded), GPT-2's tokenizer (vocab.json, "
                                            "merges.txt, tokenizer_config.json, "
                                            "special_tokens_map.json), generation_config.json "
                                            "and a model card (README.md): transformers' "
                                            "Auto classes and pipeline load it as they load "
                                            "OpenAI's gpt2.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by training")
    p.add_argument("--out", required=True, help="the folder to write (made if need be; files "
                                                "of these names in it are replaced)")
    return p


def bench_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpt2.py bench",
                                formatter_class=HelpFormatter,
                                description="Measure training and generation speed; the last "
                                            "line printed is a JSON object of the results.")
    add_model_flags(p)
    p.add_argument("--batch_size", type=int_at_least(1), default=8, help="micro-batch B")
    p.add_argument("--seq_len", type=int_at_least(1), default=256, help="sequence length T")
    p.add_argument("--loss_chunk", type=int_at_least(-1), default=-1, help="as in training (-1 = auto)")
    p.add_argument("--reps", type=int_at_least(1), default=5, help="timed repetitions of each measurement")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed repetitions first")
    p.add_argument("--gen_tokens", type=int_at_least(1), default=128, help="tokens generated after a "
                   "16-token prompt, at batch 1 and 8")
    p.add_argument("--train_only", action="store_true",
                   help="only the training step and peak memory (e.g. to size a fine-tune)")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="as in training: time the step, and measure what it keeps, with it")
    add_device_flags(p)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="as in training")
    p.add_argument("--dist_backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="under torchrun, which times the optimizer step alone in every "
                        "process: as in training")
    add_compile_flag(p)
    p.add_argument("--hellaswag_examples", type=int_at_least(1), default=40,
                   help="HellaSwag val rows scored for its examples/s (from samples/)")
    p.add_argument("--core_examples", type=int_at_least(11), default=24,
                   help="HellaSwag val rows scored 10-shot as CORE scores them, for its examples/s")
    p.add_argument("--vs_transformers", action="store_true",
                   help="also time transformers' cached generate on the same weights "
                        "(needs requirements-dev.txt)")
    return p


def plot_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpt2.py plot",
                                formatter_class=HelpFormatter,
                                description="Plot a run's log.jsonl as a PNG.")
    p.add_argument("--log_dir", default="log", help="the run's --log_dir")
    p.add_argument("--out", help="PNG to write (default LOG_DIR/loss.png)")
    return p


def train_command(args):
    train(TrainConfig.from_flags(vars(args)))  # the flags, typed and frozen, by section


COMMANDS = {"train": (train_parser, train_command), "sample": (sample_parser, sample),
            "hellaswag": (hellaswag_parser, hellaswag_command),
            "export": (export_parser, export),
            "bench": (bench_parser, bench), "plot": (plot_parser, plot)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    make_parser, run = COMMANDS[command]
    try:
        args = make_parser().parse_args(argv)
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a full disk, a read-only folder, ...: the path and the reason
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one anywhere else
        print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Stopped as e:
        if not e.quiet:
            print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.code)
