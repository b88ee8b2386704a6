"""Shared plumbing: cache directory, logging, device autodetect, distributed init/teardown, atomic writes."""
import ctypes
import functools
import logging
import os
import sys
import tempfile
from contextlib import contextmanager

import torch
import torch.distributed as dist

logger = logging.getLogger("nanochat")


def setup_logging(level=logging.INFO):
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
    logger.setLevel(level)
    return logger


def run_logged(fn, *args, **kwargs):
    """The data commands' exit contract: run fn with logging on; a RuntimeError (our clear, user-facing
    errors) is logged as one line and becomes exit code 1 instead of a traceback."""
    setup_logging()
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:
        logger.error(str(e))
        return 1
    return 0


def get_base_dir():
    """The one cache directory every stage reads from and writes to ($NANOCHAT_BASE_DIR)."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment. Never assumes local == global rank."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def script_argv(argv=None):
    """A stage's command-line arguments without the `--` that `torchrun ... -m scripts.X -- --flags`
    passes on (argparse would read everything after it as positionals)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return argv[1:] if argv[:1] == ["--"] else argv


def is_ddp():
    return dist.is_available() and dist.is_initialized()


def print0(*args, **kwargs):
    """print on global rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def reuse_freed_memory():
    """Where the C library is glibc, keep freed memory in the heap for the next allocation instead of handing
    large blocks back to the OS. glibc maps every block over 32 MB (a step's logits, its activations) fresh
    from the OS and unmaps it on free, so a CPU training step page-faults those hundreds of MB in again, every
    step: 9-11% of a d4 or d8 step on the dev box (dev/notes_train.md). The price: the process keeps its peak
    heap. Returns whether the setting took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameter numbers in glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # another C library (musl has no libc.so.6 / no mallopt)
        return False


def compute_init(device_type=None, seed=42):
    """Pick the device, seed RNGs, init torch.distributed when launched by torchrun.
    Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device-type cuda requested but CUDA is not available; use --device-type cpu")
    torch.manual_seed(seed)
    if device_type == "cpu":
        reuse_freed_memory()
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp:
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            device = torch.device(device_type)
            dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if is_ddp():
        dist.barrier()  # nobody tears the group down while another rank still works (gloo can abort at exit)
        dist.destroy_process_group()


@contextmanager
def atomic_write(path, mode="wb"):
    """Write to a temp file in the same directory, fsync, then rename: a kill never leaves a half file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path):
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


@functools.lru_cache(maxsize=None)  # asked at every optimizer step (Muon): read /proc/cpuinfo once
def native_bf16_cpu(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU multiplies bf16 in hardware (the avx512_bf16 or amx_bf16 flags of Linux's cpuinfo)."""
    try:
        with open(cpuinfo) as f:
            return bool({"avx512_bf16", "amx_bf16"} & set(f.read().split()))
    except OSError:  # not Linux: assume not
        return False


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dtype):
    """torch.bfloat16 -> "bfloat16": the spelling of --dtype and $NANOCHAT_DTYPE."""
    return str(dtype).removeprefix("torch.")


def compute_dtype(device_type, flag="auto"):
    """The one decision of the dtype a model computes in (its weights stay fp32): the --dtype flag when it is
    not auto, else $NANOCHAT_DTYPE, else what the hardware does fastest: bf16 on CUDA GPUs that have it, fp16
    on older ones (training then scales its loss), bf16 on CPUs that multiply it natively, fp32 elsewhere
    (bf16 is emulated, slowly, on other CPUs; MPS runs fp32)."""
    name = flag if flag and flag != "auto" else os.environ.get("NANOCHAT_DTYPE", "")
    if name:
        if name not in DTYPES:
            source = "--dtype" if flag and flag != "auto" else "NANOCHAT_DTYPE"
            raise ValueError(f"{source}={name!r} is not a compute dtype: use one of {', '.join(DTYPES)} "
                             "(or unset it for the hardware's default)")
        return DTYPES[name]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "cpu" and native_bf16_cpu():
        return torch.bfloat16
    return torch.float32


def sum_dtype(device):
    """The dtype for sums of many losses: float64, except on MPS, which has none."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def all_reduce(values, device, op="sum"):
    """Reduce a number or a list of numbers across ranks (sum, min or max); a no-op in one process.
    -> the same shape back (float or list of floats)."""
    single = not isinstance(values, (list, tuple))
    if is_ddp():
        t = torch.tensor([values] if single else list(values), dtype=sum_dtype(device), device=device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        values = t.tolist()
        return values[0] if single else values
    return values if single else list(values)


# bf16 dense peak FLOP/s per device, for MFU; the first name fragment found in the device name wins
GPU_PEAK_FLOPS = [("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
                  ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A6000", 155e12),
                  ("4090", 165e12), ("3090", 71e12), ("A10", 125e12), ("L4", 121e12), ("T4", 65e12), ("V100", 125e12)]


def gpu_peak_flops(device_name):
    """The bf16 peak of a GPU by its name (torch.cuda.get_device_name), or None when it is not in the table."""
    return next((flops for fragment, flops in GPU_PEAK_FLOPS if fragment in device_name), None)


def json_default(obj):
    """json.dump(..., default=json_default): metadata may hold tensors and numpy scalars (metrics often are)."""
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"value of type {type(obj).__name__} is not JSON serialisable")


def format_eta(seconds):
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
