"""The skeleton every training stage shares (base_train, mid_train, chat_sft, chat_rl, chat_dpo): flags, start-up,
start fresh or resume, LR schedule, the optimizer update, the loop's eval and checkpoint cadence, the step log and
checkpoints. A stage brings its data, its loss and its step (forward, backward, update); this module knows neither."""
import dataclasses
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import (
    SOURCES,
    add_model_args,
    build_model,
    find_largest_model,
    find_last_step,
    load_model,
    optim_path,
    remove_stale_temp,
    save_checkpoint,
    start_fresh,
)
from nanochat.common import compute_dtype, compute_init, format_eta, get_base_dir, print0
from nanochat.hardware import device_batch_flag, peak_flops_per_device, resolve_compile
from nanochat.reshard import full_optimizer_states, load_resharded

# ------------------------------------------------------------------------------------------------
# flags


def add_training_args(p, sources=(), source=""):
    """The flags of every stage that trains with the LR schedule below, and the model-selection flags
    (checkpoint_manager.add_model_args; `sources`: the stages it may start from); a stage adds its own and
    changes defaults with p.set_defaults."""
    add_model_args(p, sources, source, step=bool(sources))
    p.add_argument("--run", default="dummy", help="wandb run name; wandb is used only when set and not 'dummy'")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile (auto: on for CUDA and CPU, off for MPS)")
    p.add_argument("--device-batch-size", type=device_batch_flag, default=32, help="sequences per forward/backward "
                   "per rank; auto: the largest power of two (up to 64) that fits in memory, found by trying")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the data or the horizon)")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (embedding and lm_head)")
    p.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of the steps at the end over which "
                   "the LRs decay linearly to 0")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps; -1: only at the end")
    p.add_argument("--keep-last", type=int, default=-1, help="keep only the newest N checkpoints; -1: keep all")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --model-tag")
    p.add_argument("--peak-flops", type=float, default=-1, help="per-device peak FLOP/s for MFU (default: the "
                   "GPU's bf16 peak by name on CUDA, a measured matmul on CPU)")
    p.add_argument("--loss-file", default="", help="rank 0 appends {step, loss, lrm} JSON lines here (full precision)")
    p.add_argument("--stop-after", type=int, default=-1, help="debug: save a checkpoint after this many steps and "
                   "exit as if killed (continue with --resume)")


def add_finetune_args(p):
    """The flags of the stages that continue a trained model on a conversation mixture (mid_train, chat_sft)."""
    p.add_argument("--mixture", default="", help="comma-separated training tasks (see the module docstring)")
    p.add_argument("--identity-file", default="", help="JSONL of identity conversations added to the mixture")
    p.add_argument("--max-per-task", type=int, default=-1, help="cap examples per task (-1: no cap)")
    p.add_argument("--val-examples", type=int, default=500, help="conversations held out for validation "
                   "(at most a tenth of the mixture)")
    p.add_argument("--init-lr-frac", type=float, default=1.0, help="LRs are the base LRs times this")


# ------------------------------------------------------------------------------------------------
# start-up


@dataclasses.dataclass
class Run:
    """What one training process runs on: its rank, device and numerics."""
    ddp: bool
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype = torch.float32  # the model's compute dtype (nanochat.common.compute_dtype)
    compile: bool = False
    # fp16 only: scales the loss up so that small gradients do not underflow, and skips steps that overflow
    scaler: Any = None

    @property
    def master(self):
        return self.rank == 0

    def backward(self, loss):
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def compiled(self, model):
        """The model to train with: compiled when the run compiles (checkpoints and sampling keep the original)."""
        return torch.compile(model, dynamic=False) if self.compile else model


def start_run(args, seed=42):
    """compute_init, and the numerics from --device-type, --dtype and --compile (a stage without --compile
    does not compile)."""
    ddp, rank, _, world_size, device = compute_init(args.device_type or None, seed=seed)
    dtype = compute_dtype(device.type, args.dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return Run(ddp, rank, world_size, device, dtype, resolve_compile(getattr(args, "compile", "off"), device.type),
               scaler)


def init_wandb(run, name, project, config):
    """A wandb run on rank 0 when --run names one (not 'dummy'), else None. Without the wandb package, or when
    wandb cannot start, the training goes on unlogged and says so: a missing extra must not end a run hours in.
    Without credentials (no WANDB_API_KEY, no `wandb login` in ~/.netrc) it logs offline and says where: asking
    for a key would stop an unattended run, and wandb raises without a terminal. WANDB_MODE, when set, decides."""
    if not run.master or not name or name == "dummy":
        return None
    try:
        import wandb
    except ImportError:
        print0(f"warning: --run {name} asks for wandb but the package is not installed (pip install wandb); "
               "training continues without it")
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_credentials() else "offline")
    for attempt in dict.fromkeys([mode, "offline"]):  # online failing (bad key, no network): offline instead
        try:
            wandb_run = wandb.init(project=project, name=name, config=config, mode=attempt)
        except Exception as e:  # noqa: BLE001 - wandb's errors vary by version; logging must not end a run
            print0(f"warning: wandb ({attempt}) did not start: {type(e).__name__}: {e}")
            continue
        if attempt == "offline" and mode != "offline":
            print0("warning: wandb could not log online")
        if attempt == "offline":
            where = os.path.dirname(wandb_run.dir.rstrip(os.sep))
            print0(f"wandb: logging offline to {where} (no API key: `wandb login` or WANDB_API_KEY to log online; "
                   f"`wandb sync {where}` uploads this run later)")
        return wandb_run
    print0("warning: training continues without wandb")
    return None


def _wandb_credentials():
    """Whether wandb has a key without asking for one: WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc."""
    import netrc
    from urllib.parse import urlparse
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_optimizers(model, args, lr_frac=1.0):
    """{"adamw", "muon"} from the LR flags, every LR times lr_frac (each group records its initial_lr)."""
    return model.setup_optimizers(unembedding_lr=args.unembedding_lr * lr_frac,
                                  embedding_lr=args.embedding_lr * lr_frac, matrix_lr=args.matrix_lr * lr_frac,
                                  weight_decay=args.weight_decay)


@dataclasses.dataclass
class Training:
    """One training run of a stage: the model it trains (uncompiled), where its checkpoints go, and where it
    starts: step 0, or (resumed) a checkpoint of its own. begin() then sets the rest."""
    run: Run
    args: Any  # the stage's parsed flags
    model: Any
    tokenizer: Any
    tag: str
    checkpoint_dir: str
    step: int = 0  # the first step this process runs
    meta: dict | None = None  # the meta of the checkpoint resumed from (None: a fresh start)
    rank_state: dict | None = None  # this rank's saved optimizer and RNG state (resumed only)
    optimizers: dict | None = None
    loop: dict | None = None  # the loop's running numbers; checkpoints carry them
    num_iterations: int = 0

    def __post_init__(self):
        self.model.compute_dtype = self.run.dtype

    @property
    def resumed(self):
        return self.meta is not None

    def begin(self, optimizers, loop, num_iterations, same, reshard_positions=None):
        """Resumed: check the settings `same` against the checkpoint's, restore the optimizers, RNG and `loop`.
        Fresh: move earlier checkpoints of the tag aside. -> this rank's data position, or None. A checkpoint
        saved by another number of ranks is resharded: the optimizer state exactly, the data positions by
        reshard_positions(saved positions, world_size) (a stage without one cannot change its world size)."""
        self.optimizers, self.loop, self.num_iterations = optimizers, loop, num_iterations
        run = self.run
        if not self.resumed:
            self.start_fresh()
            return None
        saved_world = self.meta["world_size"]
        if saved_world != run.world_size and reshard_positions is None:
            raise SystemExit(f"the checkpoint was saved by {saved_world} ranks; this stage resumes only on as many "
                             f"(this run has {run.world_size})")
        check_resume(self.meta, {k: v for k, v in same.items() if k != "world_size"}, num_iterations)
        restore_training_state(optimizers, self.rank_state, self.model, run)
        loop.update(self.meta["loop_state"])
        positions = self.meta["loader_states"]
        if saved_world != run.world_size:
            positions = reshard_positions(positions, run.world_size)
            print0(f"resharded a {saved_world}-rank checkpoint onto {run.world_size} ranks: the model and optimizer "
                   f"state exactly, the data position approximately (rank 0 continues at {positions[0]})")
        print0(f"resumed from {self.checkpoint_dir} at step {self.meta['step']}")
        if run.master and remove_stale_temp(self.checkpoint_dir):  # before this run's first save
            print0("removed temp files a killed save had left in the checkpoint directory")
        return positions[run.rank]

    def start_fresh(self):
        """A new run of the tag replaces the old one: rank 0 moves its checkpoints aside (begin does it; a stage
        that writes files there before begin calls it first)."""
        if self.run.master:
            prev = start_fresh(self.checkpoint_dir)
            if prev:
                print0(f"new run of {self.checkpoint_dir}: earlier checkpoints moved to {prev} "
                       "(use --resume to continue them)")

    def update(self, lrm, muon_momentum=None):
        """The optimizer update: every group's LR is its initial_lr x lrm (and Muon's momentum muon_momentum when
        given); both optimizers step; the gradients are cleared. Under fp16 the gradients are unscaled first,
        and a step whose gradients overflowed anywhere is skipped by both optimizers on every rank (the scaler
        then lowers its scale)."""
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        if muon_momentum is not None:
            for group in self.optimizers["muon"].param_groups:
                group["momentum"] = muon_momentum
        scaler = self.run.scaler
        if scaler is None:
            for opt in self.optimizers.values():
                opt.step()
        else:
            self._scaled_step(scaler)
        self.model.zero_grad(set_to_none=True)

    def _scaled_step(self, scaler):
        """fp16: unscale the gradients and step. The scaler decides per optimizer and rank, but a half-applied
        step, or one rank skipping alone (the others would wait in the optimizers' collectives), must not
        happen: an overflow anywhere skips the whole step everywhere."""
        if self.run.ddp:  # the distributed optimizers read a missing gradient as zeros: make it so, so that every
            for p in self.model.parameters():  # rank unscales, decides and steps alike
                if p.grad is None and p.requires_grad:
                    p.grad = torch.zeros_like(p)
        # an optimizer without gradients (an RL step whose advantages were all 0) has nothing to unscale: its
        # step is a no-op
        stepped = [opt for opt in self.optimizers.values()
                   if any(p.grad is not None for group in opt.param_groups for p in group["params"])]
        for opt in stepped:
            scaler.unscale_(opt)
        found = [f for opt in stepped for f in scaler._found_inf_per_device(opt).values()]
        if found:
            overflow = torch.stack([f.to(self.run.device) for f in found]).amax()
            if self.run.ddp:
                dist.all_reduce(overflow, op=dist.ReduceOp.MAX)
            for f in found:
                f.copy_(overflow)
        for opt in self.optimizers.values():
            scaler.step(opt) if opt in stepped else opt.step()
        if found:
            scaler.update()

    def scheduled_update(self, step):
        """update() with the LR schedule of --warmdown-ratio and Muon's momentum warm-up. -> the LR multiplier."""
        lrm = lr_multiplier(step, self.num_iterations, self.args.warmdown_ratio)
        self.update(lrm, muon_momentum(step))
        return lrm

    def checkpoint_meta(self, step, loader_position, **extra):
        """The meta of a checkpoint at `step`: what resuming needs (batch layout, every rank's data position, the
        loop state) and what later stages read (model_config); `extra` holds the stage's own."""
        run = self.run
        return {"step": step, "model_config": dataclasses.asdict(self.model.config), "user_config": vars(self.args),
                "world_size": run.world_size, "num_iterations": self.num_iterations,
                "loader_states": gather_objects(loader_position, run.world_size), "loop_state": self.loop, **extra}

    def save(self, step, meta):
        """Model + this rank's optimizer states and RNG state + meta. Every rank must call it."""
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        optim = {"optimizers": {kind: opt.state_dict() for kind, opt in self.optimizers.items()}, "rng": rng}
        keep = self.args.keep_last if self.args.keep_last > 0 else None
        save_checkpoint(self.checkpoint_dir, step, self.model.state_dict(), optim, meta, rank=self.run.rank,
                        keep_last=keep)
        print0(f"saved checkpoint {self.checkpoint_dir} step {step}")


def resume_training(run, args, checkpoint_dir, tag):
    """A Training that continues the latest checkpoint in checkpoint_dir (the model as saved, the optimizer and RNG
    state this rank needs); a clear SystemExit when there is none."""
    try:
        step = find_last_step(checkpoint_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"cannot resume: {e}. Start afresh without --resume (or check --save-tag/--model-tag)")
    model, tokenizer, meta = build_model(checkpoint_dir, step, run.device, "train")
    return Training(run, args, model, tokenizer, tag, checkpoint_dir, step, meta,
                    load_training_state(checkpoint_dir, step, meta, run))


def load_start_model(args, source, out_dirname, run, save_tag=""):
    """The Training of a later stage: from the source stage's model (--model-tag, --step), or with --resume from
    this stage's latest checkpoint. save_tag names the out_dirname/<tag> this run writes (default: the loaded tag),
    so one stage can run twice in a row (a drill, then the real run starting from it) without overwriting its start."""
    if source not in SOURCES:
        raise SystemExit(f"unknown source {source!r}: expected one of {', '.join(SOURCES)}")
    src_dir = os.path.join(get_base_dir(), SOURCES[source][0])
    out_root = os.path.join(get_base_dir(), out_dirname)
    tag = args.model_tag
    if args.resume:
        tag = save_tag or tag or find_largest_model(out_root)
        return resume_training(run, args, os.path.join(out_root, tag), tag)
    if not tag:
        try:
            tag = find_largest_model(src_dir)
        except FileNotFoundError:
            pass  # load_model below gives the helpful error
    out_tag = save_tag or tag
    if tag and os.path.join(src_dir, tag) == os.path.join(out_root, out_tag):
        # starting afresh moves the tag's earlier checkpoints aside: that would be the model just loaded
        raise SystemExit(f"this run would overwrite the checkpoint it starts from ({out_dirname}/{tag}): "
                         "give --save-tag a different tag")
    model, tokenizer, _ = load_model(source, run.device, "train", model_tag=tag or None, step=args.step)
    return Training(run, args, model, tokenizer, out_tag, os.path.join(out_root, out_tag))


def source_model(source, tag, step):
    """{"stage", "tag", "step"} of a source stage's checkpoint (the latest step when step is None): what a
    stage records of the model it started from. tag None: the largest; a clear SystemExit when there is none."""
    src_dir = os.path.join(get_base_dir(), SOURCES[source][0])
    try:
        tag = tag or find_largest_model(src_dir)
        step = step if step is not None else find_last_step(os.path.join(src_dir, tag))
    except FileNotFoundError as e:
        raise SystemExit(f"{e}. No {source} model to start from: run `python -m {SOURCES[source][1]}` "
                         "first (or pick another --source)") from None
    return {"stage": source, "tag": tag, "step": step}


def check_resume(meta, same, num_iterations):
    """Resuming exactly needs the same batch layout as the run that saved the checkpoint; a different
    number of steps is allowed (the LR schedule then changes from here on) but said."""
    diff = {k: (meta.get(k), v) for k, v in same.items() if meta.get(k) != v}
    if diff:
        raise SystemExit(f"cannot resume exactly: the checkpoint was made with different settings {diff} (saved, now)")
    if meta["step"] > num_iterations:
        raise SystemExit(f"the checkpoint is at step {meta['step']}, past this run's {num_iterations} steps: "
                         "raise --num-iterations (or start afresh without --resume)")
    if meta["num_iterations"] != num_iterations:
        print0(f"warning: the checkpoint planned {meta['num_iterations']} steps, this run {num_iterations}: "
               "the LR schedule changes from here on")


def accumulation_steps(total_batch_size, B, T, world_size):
    """Micro-batches per optimizer step for a total batch in tokens."""
    tokens_per_fwdbwd = B * T * world_size
    if total_batch_size % tokens_per_fwdbwd:
        raise SystemExit(f"--total-batch-size {total_batch_size} must be a multiple of device_batch_size x "
                         f"max_seq_len x world_size = {B} x {T} x {world_size} = {tokens_per_fwdbwd}")
    return total_batch_size // tokens_per_fwdbwd


# ------------------------------------------------------------------------------------------------
# the schedule and the loop


def lr_multiplier(step, num_iterations, warmdown_ratio):
    """Constant, then a linear warmdown to 0 over the last warmdown_ratio of the steps."""
    warmdown = round(warmdown_ratio * num_iterations)
    if step <= num_iterations - warmdown:
        return 1.0
    return (num_iterations - step) / warmdown


def muon_momentum(step):
    """Muon's momentum warms up from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


class Prefetch:
    """Keeps the next batch of a loader yielding (inputs, targets, position after the batch) in hand, so the host
    prepares it while the device works, and knows the position a checkpoint must resume from: where the batch
    in hand starts."""

    def __init__(self, loader, position=None):
        self.loader, self.position = loader, position
        self.x, self.y, self.after = next(loader)

    def advance(self):
        self.position = self.after
        self.x, self.y, self.after = next(self.loader)


def eval_due(step, every, last_step, resumed_here):
    """Evaluate at step 0, every `every` steps and at the end, but not again at the step a run resumed at
    (the interrupted run did it)."""
    return (last_step or (every > 0 and step % every == 0)) and not (resumed_here and not last_step)


def save_due(step, every, last_step, stop_after, resumed_here):
    return last_step or step == stop_after or (every > 0 and step > 0 and step % every == 0 and not resumed_here)


def train_loop(training, log, train_step, evaluate, checkpoint_meta):
    """The loop every stage shares. Before each optimizer step: evaluate(step, last_step, resumed_here) (the
    stage picks its evaluations with eval_due), a checkpoint when due (checkpoint_meta(step) -> its meta), the
    end at num_iterations or --stop-after; then train_step(step) -> (loss, lr multiplier, tokens processed,
    extra numbers for the log) and the step's log line. -> the step it stopped at (num_iterations: finished)."""
    args = training.args
    for step in range(training.step, training.num_iterations + 1):
        last_step = step == training.num_iterations
        resumed_here = training.resumed and step == training.step  # the interrupted run evaluated and saved here
        evaluate(step, last_step, resumed_here)
        if save_due(step, args.save_every, last_step, args.stop_after, resumed_here):
            training.save(step, checkpoint_meta(step))
        if last_step or step == args.stop_after:
            return step
        t0 = time.time()
        loss, lrm, tokens, extra = train_step(step)
        log.step(step, loss, lrm, time.time() - t0, tokens, extra)
    return training.num_iterations


# ------------------------------------------------------------------------------------------------
# the step log


class StepLog:
    """One progress line per step (EMA-smoothed loss, LR multiplier, step time, tok/s, MFU, ETA); rank 0 also
    appends the raw loss to --loss-file and logs to wandb. The running numbers live in `loop`, the dict a
    checkpoint carries, so a resumed run continues the same curve and training time."""
    ema_beta = 0.9
    untimed_steps = 3  # a process's first steps include compilation and warm-up: kept out of time and ETA

    def __init__(self, run, num_iterations, start_step, loop, loss_file="", wandb_run=None, flops_per_token=0,
                 peak_flops=-1, curve=False):
        """flops_per_token=0: no MFU; peak_flops is the --peak-flops flag (<= 0: find it, see peak_flops_per_device);
        curve: also keep [step, smoothed loss] pairs in loop["history"] (for a plot)."""
        self.run, self.num_iterations, self.start_step, self.loop = run, num_iterations, start_step, loop
        self.curve = curve
        loop.setdefault("smooth_train_loss", 0.0)
        loop.setdefault("total_training_time", 0.0)
        self.loss_file = open(loss_file, "a") if run.master and loss_file else None
        self.wandb_run = wandb_run
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops_per_device(peak_flops, run) if flops_per_token else None
        self.run_time, self.timed_steps = 0.0, 0  # this process only, for the ETA
        self.tok_per_sec = self.mfu = 0.0  # of the last step, for the report

    def step(self, step, loss, lrm, dt, processed_tokens, extra=None):
        """Log optimizer step `step`: its loss (mean over ranks), dt seconds, the tokens all ranks processed;
        `extra` numbers go to the line, the loss file and wandb. -> the smoothed loss."""
        loop, beta, extra = self.loop, self.ema_beta, extra or {}
        loop["smooth_train_loss"] = beta * loop["smooth_train_loss"] + (1 - beta) * loss
        smooth = loop["smooth_train_loss"] / (1 - beta ** (step + 1))
        if step - self.start_step >= self.untimed_steps:
            loop["total_training_time"] += dt
            self.run_time += dt
            self.timed_steps += 1
        self.tok_per_sec = processed_tokens / dt
        mfu = ""
        if self.peak_flops:
            self.mfu = 100 * self.flops_per_token * self.tok_per_sec / (self.peak_flops * self.run.world_size)
            mfu = f" | mfu {self.mfu:.2f}%"
        avg_dt = self.run_time / self.timed_steps if self.timed_steps else dt
        eta = format_eta(avg_dt * (self.num_iterations - step - 1))
        # the first steps of a compiled run are mostly compilation: say so rather than show a slow dt
        warm = " | compile warm-up" if self.run.compile and step - self.start_step < self.untimed_steps else ""
        more = "".join(f" | {k} {v:,}" if isinstance(v, int) else f" | {k} {v:.4f}" for k, v in extra.items())
        print0(f"step {step:05d}/{self.num_iterations:05d} ({100 * (step + 1) / self.num_iterations:.1f}%) | "
               f"loss {smooth:.6f} | lrm {lrm:.3f} | dt {dt * 1000:.1f}ms | tok/s {self.tok_per_sec:,.0f}{mfu}"
               f"{more} | eta {eta}{warm}")
        if self.loss_file:
            self.loss_file.write(json.dumps({"step": step, "loss": loss, "lrm": lrm, **extra}) + "\n")
            self.loss_file.flush()
        if self.wandb_run:
            self.wandb_run.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/dt": dt,
                                "train/tok_per_sec": self.tok_per_sec, "train/mfu": self.mfu,
                                **{f"train/{k}": v for k, v in extra.items()}})
        if self.curve:
            loop.setdefault("history", []).append([step, round(smooth, 5)])
        return smooth

    def eval(self, step, metrics):
        """Log evaluation results {name: value} at `step`."""
        print0(f"step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
        if self.wandb_run:
            self.wandb_run.log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})

    def close(self):
        if self.loss_file:
            self.loss_file.close()
        if self.wandb_run:
            self.wandb_run.finish()


# ------------------------------------------------------------------------------------------------
# batches and checkpoints


def collate(rows, pad_id, device="cpu", T=None, pad_to=None):
    """rows: (ids, mask) pairs from render_conversation, cut to T+1 tokens when T is given. Inputs are
    ids[:-1], targets ids[1:] where mask[1:] is 1 and -1 elsewhere; rows are right-padded (inputs with
    pad_id, targets with -1) to the longest row, or to pad_to. -> (inputs, targets) (n, L) int64 on device."""
    if T is not None:
        rows = [(ids[:T + 1], mask[:T + 1]) for ids, mask in rows]
    L = pad_to or max(1, max(len(ids) - 1 for ids, _ in rows))
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    y = torch.full((len(rows), L), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        if n <= 0:
            continue
        x[i, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        y[i, :n] = torch.where(torch.tensor(mask[1:]) == 1, torch.tensor(ids[1:], dtype=torch.long), -1)
    return x.to(device), y.to(device)


def length_bucket(n, cap, smallest=256):
    """The padded length for a batch whose longest row is n tokens: the smallest of smallest, 2*smallest, ...
    that holds it, capped at cap. Under torch.compile a few static shapes recompile a few times, while padding
    every row to cap wastes most FLOPs on conversations of a few hundred tokens."""
    length = smallest
    while length < n:
        length *= 2
    return min(length, cap)


def gather_objects(obj, world_size):
    """One picklable object per rank, on every rank (e.g. each rank's data loader position)."""
    if world_size == 1:
        return [obj]
    objs = [None] * world_size
    dist.all_gather_object(objs, obj)
    return objs


def by_kind(states):
    """Saved optimizer states as {"adamw": ..., "muon": ...}: checkpoints before the optimizers were tagged by
    kind saved them as the list [adamw, muon]."""
    return states if isinstance(states, dict) else dict(zip(("adamw", "muon"), states))


def load_training_state(checkpoint_dir, step, meta, run):
    """What restore_training_state needs: this rank's saved optimizer states and RNG, or, for a checkpoint saved
    by another number of ranks, every saved rank's optimizer states (under "shards") to reshard."""
    saved_world = meta.get("world_size", 1)

    def load(r):
        state = torch.load(optim_path(checkpoint_dir, step, r), map_location=run.device, weights_only=True)
        return {**state, "optimizers": by_kind(state["optimizers"])}
    if saved_world == run.world_size:
        return load(run.rank)
    shards = [load(r) for r in range(saved_world)]
    return {"shards": [s["optimizers"] for s in shards], "rng": shards[min(run.rank, saved_world - 1)]["rng"]}


def restore_training_state(optimizers, rank_state, model, run):
    """Undo Training.save's per-rank part: optimizer states (resharded when saved by another number of ranks)
    and RNG."""
    if "shards" in rank_state:
        adamw_params = [p for group in optimizers["adamw"].param_groups for p in group["params"]]
        muon_set = {p for group in optimizers["muon"].param_groups for p in group["params"]}
        muon_params = [p for p in model.parameters() if p in muon_set]  # setup_optimizers' order
        states = full_optimizer_states(adamw_params, muon_params, rank_state["shards"], len(rank_state["shards"]))
        load_resharded(optimizers, *states, run.rank, run.world_size)
    else:
        for kind, opt in optimizers.items():
            opt.load_state_dict(rank_state["optimizers"][kind])
    torch.set_rng_state(rank_state["rng"]["cpu"].cpu())
    if "cuda" in rank_state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(rank_state["rng"]["cuda"].cpu())
