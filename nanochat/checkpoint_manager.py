"""Saving and loading checkpoints.

<base>/{base,mid,chatsft,chatrl,chatdpo}_checkpoints/<tag>/
    model_<step:06d>.pt             model state dict (rank 0)
    optim_<step:06d>_rank<r>.pt     whatever rank r needs to resume (optimizer states, RNG, ...)
    meta_<step:06d>.json            model config, step, metrics, loader state, user config (rank 0)

Every file is written to a temp name and renamed. The meta file is written last, after all ranks
have written their shards, so a checkpoint exists exactly when its meta file does: a run killed
mid-save leaves at worst some orphan model/optim files that nothing reads.
"""
import glob
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from nanochat.common import DTYPES, atomic_torch_save, atomic_write, compute_dtype, get_base_dir, json_default
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer

# load_model's source -> directory under the base dir, and the stage that writes it
SOURCES = {
    "base": ("base_checkpoints", "scripts.base_train"),
    "mid": ("mid_checkpoints", "scripts.mid_train"),
    "sft": ("chatsft_checkpoints", "scripts.chat_sft"),
    "rl": ("chatrl_checkpoints", "scripts.chat_rl"),
    "dpo": ("chatdpo_checkpoints", "scripts.chat_dpo"),
}


def add_model_args(p, sources=(), source="", step=True):
    """The flags that pick a model and what it computes in, spelled and defaulted alike in every script that
    loads one: -i/--source (where the script offers `sources`; default `source`, required without one),
    -g/--model-tag (default: the largest model), -s/--step (default: the latest; `step`=False for a script that
    only writes checkpoints), --device-type (default: autodetect), --dtype (default: compute_dtype's choice)."""
    if sources:
        p.add_argument("-i", "--source", default=source or None, required=not source, choices=list(sources),
                       help="which stage's model to load")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest model, d<N> with "
                   "the largest N; base_train: d<depth>)")
    if step:
        p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="compute dtype (weights stay fp32); "
                   "auto: bf16 on CUDA GPUs that have it and on CPUs with native bf16 (avx512_bf16/amx_bf16), fp16 on "
                   "older GPUs, else fp32; $NANOCHAT_DTYPE overrides auto")


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_states, meta, rank=0, keep_last=None):
    """Write one checkpoint. When distributed, EVERY rank must call this (there is a barrier inside):
    rank 0 writes the model and meta, each rank its own optimizer shard (skipped if optimizer_states
    is None). keep_last=k deletes all but the newest k complete checkpoints afterwards."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if optimizer_states is not None:
        atomic_torch_save(optimizer_states, optim_path(checkpoint_dir, step, rank))
    if rank == 0:
        atomic_torch_save(model_state, model_path(checkpoint_dir, step))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every shard is on disk before meta declares the checkpoint complete
    if rank == 0:
        with atomic_write(meta_path(checkpoint_dir, step), "w") as f:
            json.dump(meta, f, indent=2, default=json_default)
        if keep_last:
            prune_checkpoints(checkpoint_dir, keep_last)


def remove_stale_temp(checkpoint_dir):
    """Delete the hidden .<file>.*.tmp files a killed save leaves behind (gigabytes each at full size).
    Call only from the run that owns the directory, before its first save (start or resume): another
    process writing checkpoints into the same directory right now would lose its file. -> names removed."""
    removed = []
    for p in glob.glob(os.path.join(glob.escape(checkpoint_dir), ".*.tmp")):
        if os.path.isfile(p):
            os.remove(p)
            removed.append(os.path.basename(p))
    return sorted(removed)


def start_fresh(checkpoint_dir):
    """A new (not resumed) run of a tag replaces the old one: move earlier checkpoints to <tag>.prev
    (one generation kept) so a stale later step can never be mistaken for this run's latest.
    Call on rank 0 before the first save."""
    remove_stale_temp(checkpoint_dir)
    if not complete_steps(checkpoint_dir) and not glob.glob(os.path.join(checkpoint_dir, "*.pt")):
        return None
    prev = checkpoint_dir.rstrip("/") + ".prev"
    if os.path.isdir(prev):
        shutil.rmtree(prev)
    os.replace(checkpoint_dir, prev)
    return prev


def complete_steps(checkpoint_dir):
    """Sorted steps that have both a meta and a model file."""
    steps = []
    for p in glob.glob(os.path.join(checkpoint_dir, "meta_*.json")):
        m = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(p))
        if m and os.path.exists(model_path(checkpoint_dir, int(m.group(1)))):
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    steps = complete_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (model_*.pt + meta_*.json) in {checkpoint_dir}")
    return steps[-1]


def prune_checkpoints(checkpoint_dir, keep_last):
    """Delete every complete checkpoint but the newest keep_last. Meta goes first, so a prune that is
    interrupted leaves an incomplete (ignored) checkpoint, never a broken one."""
    for step in complete_steps(checkpoint_dir)[:-keep_last]:
        os.remove(meta_path(checkpoint_dir, step))
        optim_paths = glob.glob(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank*.pt"))
        for p in [model_path(checkpoint_dir, step)] + optim_paths:
            if os.path.exists(p):
                os.remove(p)


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """-> (model_state, optim_states or None, meta). optim_states is what this rank saved."""
    mpath = meta_path(checkpoint_dir, step)
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"checkpoint step {step} in {checkpoint_dir} is missing or incomplete "
                                f"(no {os.path.basename(mpath)})")
    with open(mpath) as f:
        meta = json.load(f)
    model_state = torch.load(model_path(checkpoint_dir, step), map_location=device, weights_only=True)
    optim_states = None
    if load_optimizer:
        opath = optim_path(checkpoint_dir, step, rank)
        if not os.path.exists(opath):
            raise FileNotFoundError(f"no optimizer shard {opath} (was the run saved with a different number of ranks?)")
        optim_states = torch.load(opath, map_location=device, weights_only=True)
    return model_state, optim_states, meta


def find_largest_model(checkpoints_dir):
    """The tag with the largest depth (d20 beats d4); tags not named d<N> count only if nothing else exists
    (then the most recently written one wins). Only tags holding a complete checkpoint are considered."""
    tags = [t for t in sorted(os.listdir(checkpoints_dir)) if os.path.isdir(os.path.join(checkpoints_dir, t))
            and complete_steps(os.path.join(checkpoints_dir, t))] if os.path.isdir(checkpoints_dir) else []
    if not tags:
        raise FileNotFoundError(f"no complete checkpoints under {checkpoints_dir}")
    depth_tags = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depth_tags:
        return max(depth_tags)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def build_model(checkpoint_dir, step, device, phase, dtype="auto"):
    """Rebuild the GPT saved at checkpoint_dir/step, computing in compute_dtype(device, dtype). phase: "train" or
    "eval". -> (model, tokenizer, meta)."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device)
    # torch.compile prefixes parameter names; bf16 weights are upcast where bf16 compute is slow/absent
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    if device.type != "cuda":
        model_state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_state.items()}
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills the non-persistent rotary buffers; parameters are replaced below
    model.load_state_dict(model_state, strict=True, assign=True)
    model.train() if phase == "train" else model.eval()
    model.compute_dtype = compute_dtype(device.type, dtype)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.get_vocab_size()} != model vocab {config.vocab_size}: "
                         "the tokenizer in the base dir is not the one this model was trained with")
    return model, tokenizer, meta


def load_model(source, device, phase, model_tag=None, step=None, dtype="auto"):
    """Load the model of a stage: source is a key of SOURCES ("base", "mid", "sft", "rl", "dpo"); the largest tag
    and the latest step unless given; dtype: the --dtype flag (see build_model). -> (model, tokenizer, meta)."""
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; expected one of {sorted(SOURCES)}")
    dirname, script = SOURCES[source]
    checkpoints_dir = os.path.join(get_base_dir(), dirname)
    try:
        if model_tag is None:
            model_tag = find_largest_model(checkpoints_dir)
        checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
        if step is None:
            step = find_last_step(checkpoint_dir)
        elif step not in complete_steps(checkpoint_dir):
            raise FileNotFoundError(f"no complete checkpoint for step {step} in {checkpoint_dir}")
    except FileNotFoundError as e:
        tags = sorted(t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))) \
            if os.path.isdir(checkpoints_dir) else []
        raise FileNotFoundError(f"{e}. No {source} model to load: run `python -m {script}` first "
                                f"(or check NANOCHAT_BASE_DIR / --model-tag / --step; tags there: "
                                f"{', '.join(tags) or 'none'})") from None
    return build_model(checkpoint_dir, step, device, phase, dtype)
