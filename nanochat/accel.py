"""GPU-only accelerations behind base_train's flags: fp8 matmuls through torchao (--fp8) and Flash Attention 3
through the `kernels` package (--fa3). Each checks what it needs and, when something is missing, says which
thing and falls back to the plain path; neither changes a parameter name, so checkpoints are the same either way.

Neither has run on a GPU of ours yet (no GPU lent): dev/gpu_check.sh has the rows that must pass before a
profile turns one on. What the CPU can check (the fallbacks, the FA3 call's layout and windows) is tested.
"""
import torch
from torch import nn

from nanochat.common import dtype_name

FP8_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (sm89), Hopper (sm90), Blackwell (sm100)
FA3_KERNEL = "kernels-community/flash-attn3"  # the Hub repository `kernels` loads FA3 from (Ampere, Ada, Hopper builds)


def fp8_unavailable(device):
    """Why fp8 training cannot run here (a sentence), or None when it can."""
    if device.type != "cuda":
        return f"fp8 matmuls need an NVIDIA GPU (sm89+), this run is on {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name} is sm{cap[0]}{cap[1]}: fp8 tensor cores start at sm89 (Ada, Hopper)"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install torchao)"
    return None


def fp8_eligible(module, name):
    """torchao's fp8 matmul wants both dimensions divisible by 16; small gates (value-embedding, smear) stay bf16."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def enable_fp8(model, device):
    """Swap the model's eligible Linears for torchao's fp8-training ones (tensorwise scaling, its default recipe).
    -> a line saying what happened: how many Linears were converted, or why it fell back to the compute dtype."""
    reason = fp8_unavailable(device)
    if reason:
        return f"--fp8: falling back to the compute dtype: {reason}"
    from torchao.float8 import convert_to_float8_training
    total = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, module_filter_fn=fp8_eligible)
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    return (f"--fp8: {converted} of {total} Linears train in fp8 (tensorwise scaling; the others stay in the "
            "compute dtype)")


def load_fa3(device, dtype):
    """(FA3's flash_attn_interface, message) or (None, why not): FA3 needs CUDA, bf16 and a kernel build for this
    GPU, fetched by the `kernels` package from the Hugging Face Hub (cached after the first run)."""
    if device.type != "cuda":
        return None, ("--fa3: using SDPA: Flash Attention 3 needs an NVIDIA GPU, "
                      f"this run is on {device.type}")
    if dtype != torch.bfloat16:
        return None, f"--fa3: using SDPA: FA3 computes in bf16, this run computes in {dtype_name(dtype)}"
    try:
        from kernels import get_kernel
    except ImportError:
        return None, "--fa3: using SDPA: the `kernels` package is not installed (pip install kernels)"
    try:
        fa3 = get_kernel(FA3_KERNEL).flash_attn_interface
    except Exception as e:  # no build for this GPU, no network for the first fetch, ...
        return None, f"--fa3: using SDPA: {FA3_KERNEL} did not load on {torch.cuda.get_device_name(device)}: {e}"
    return fa3, f"--fa3: attention through {FA3_KERNEL} (windows computed by the kernel, not masked)"


def use_fa3(model, fa3):
    """Route every attention layer's full-sequence forward (training, scoring) through fa3; decoding with a KV
    cache keeps SDPA. fa3=None puts SDPA back."""
    for block in model.transformer.h:
        block.attn.fa3 = fa3
