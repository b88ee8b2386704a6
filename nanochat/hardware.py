"""What the hardware allows a training stage: whether to compile, the largest device batch that fits in memory,
and the peak FLOP/s that MFU is measured against (the compute dtype is nanochat.common.compute_dtype's). Knows
nothing of models' internals or of any stage's data."""
import argparse
import time

import torch

from nanochat.common import all_reduce, gpu_peak_flops, print0


def resolve_compile(flag, device_type):
    """--compile auto|on|off -> whether to torch.compile the model. auto: on CUDA and CPU, where it measured
    faster (inductor fuses the elementwise work around the matmuls); not on MPS."""
    return flag == "on" or (flag == "auto" and device_type in ("cuda", "cpu"))


def fit_device_batch(probe, largest, run):
    """--device-batch-size auto: the largest of largest, largest/2, ... (powers of two keep it dividing the total
    batch) for which probe(b), one forward/backward at device batch b, does not run out of memory; the smallest
    over ranks. Gradient accumulation then keeps the total batch, so only the speed changes."""
    b = largest
    while True:
        try:
            probe(b)
            break
        except torch.OutOfMemoryError:
            if b == 1:
                raise
            print(f"rank {run.rank}: device batch {b} runs out of memory, trying {b // 2}", flush=True)
            b //= 2
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
    b = int(all_reduce(b, run.device, op="min"))
    print0(f"device batch size auto: {b}")
    return b


def device_batch_flag(value):
    """argparse type for --device-batch-size: a positive number, or auto (found by probing the device)."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--device-batch-size takes a positive whole number or auto, not {value!r}")
    return int(value)


def resolve_device_batch(args, model, T, run):
    """--device-batch-size as a number; auto probes the (uncompiled) model with random tokens, starting from the
    largest power of two whose micro-batch fits in --total-batch-size."""
    if args.device_batch_size != "auto":
        return args.device_batch_size
    largest = 1
    while largest < 64 and 2 * largest * T * run.world_size <= args.total_batch_size:
        largest *= 2
    gen = torch.Generator(run.device).manual_seed(0)  # leaves the global RNG, and so exact resumes, alone

    def probe(b):
        x = torch.randint(0, model.config.vocab_size, (b, T), device=run.device, generator=gen)
        model(x, x).backward()
        model.zero_grad(set_to_none=True)
    return fit_device_batch(probe, largest, run)


def measure_peak_flops(device, dtype, sizes=(1024, 2048), seconds=0.5):
    """A per-device peak for MFU where no table knows the device: the fastest single square matmul seen in
    ~`seconds` of trials at each size. The best of many trials keeps a moment of contention from lowering the
    peak (which would inflate MFU)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm up
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def peak_flops_per_device(flag, run):
    """--peak-flops when given; on CUDA the GPU's bf16 peak by name (None, said in the log, for a GPU the table
    lacks: then no MFU); elsewhere a measured matmul."""
    if flag > 0:
        peak = flag
    elif run.device.type == "cuda":
        name = torch.cuda.get_device_name(run.device)
        peak = gpu_peak_flops(name)
        if peak is None:
            print0(f"peak FLOP/s of {name!r} unknown: no MFU in the log (pass --peak-flops to get it)")
            return None
    else:
        peak = measure_peak_flops(run.device, run.dtype)
    print0(f"peak FLOP/s per device for MFU: {peak:.3e}")
    return peak
