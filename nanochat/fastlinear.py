"""Inference-only bf16 Linears prepacked for oneDNN, for decoding on CPUs with native bf16; this module knows
nothing about training or checkpoints, and of adapters only enough to refuse them: a packed model only runs
forwards.

    pack_linears(model)          # in place: every Linear -> PackedLinear (bf16 weights); returns model

Why: a decode step is a handful of (rows x in) @ (in x out) products with 1-32 rows, and for those shapes the
bf16 kernels F.linear reaches on CPU stream the weights slowly - at batch 1 no faster than fp32 with twice the
bytes. oneDNN's inner product on a weight reordered once into its blocked layout (what inductor's freezing
does) does better: measured on a Xeon with AMX, 1 row as fast as torch.mv on the plain weight, 8 rows up to
1.3x F.linear on the large shapes (lm_head, MLP), prefill's hundreds of rows ~3x fp32. One packed copy serves
every row count, so no second layout is kept (see dev/notes_decode.md).

Only on CPUs whose cpuinfo lists avx512_bf16 or amx_bf16 (nanochat.common.native_bf16_cpu): elsewhere
bf16 matmuls are emulated, and on CUDA/MPS the packed layout does not exist. pack_linears raises there,
rather than silently doing nothing, so a caller that asked for speed knows it did not get it.
"""
import torch
import torch.nn as nn

from nanochat.common import native_bf16_cpu


def packing_supported(device):
    """(ok, reason): whether pack_linears can run for a model on `device`."""
    if torch.device(device).type != "cpu":
        return False, f"packed bf16 Linears are a CPU fast path; the model is on {device} (use bf16 weights there)"
    if not native_bf16_cpu():
        return False, "this CPU has no native bf16 (avx512_bf16/amx_bf16): packed bf16 Linears would be slower than fp32"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn), which the packed Linears run on"
    return True, ""


class PackedLinear(nn.Module):
    """A frozen, bias-free Linear whose bf16 weight lives in oneDNN's blocked layout. Inputs of any float dtype
    and shape (..., in_features) are cast to bf16; the output is bf16 (..., out_features).
    The packed weight is an opaque tensor held as a plain attribute: not a parameter or buffer, so it is in no
    state_dict (a packed model cannot be saved as if it were a checkpoint) and .to() does not touch it."""

    def __init__(self, linear, rows_hint=8):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear packs bias-free Linears only (every GPT Linear is)")
        w = linear.weight.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # the hint only picks oneDNN's blocking; the packed weight is valid for every row count
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)

    def forward(self, x):
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("PackedLinear is inference-only (no gradients): run under torch.no_grad()")
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, None, "none", [], "")

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 packed"


def pack_linears(model, rows_hint=8):
    """Turn a CPU model into a frozen inference model in place: every nn.Linear (the block matrices and the
    lm_head) replaced by a PackedLinear with bf16 weights, each block's c_q, c_k, c_v by one (attn.c_qkv);
    everything else keeps its dtype. From an fp32 model
    that leaves the embedding, the residual stream and the norms in fp32 while the Linears' outputs (so q, k, v
    and the KV cache) are bf16: measured faster than an all-bf16 model (model.to(torch.bfloat16)) at batch 1
    and 8 - CPU elementwise ops and norms on bf16 go through fp32 conversions - and closer to fp32's tokens.
    Returns the model, in eval mode. Raises RuntimeError where the fast path does not exist (see
    packing_supported) or when a LoRA is attached (adapters hook nn.Linear modules; merge and close it first,
    or run the adapter model unpacked)."""
    if getattr(model, "_lora", None) is not None:
        raise RuntimeError("this model has a LoRA attached: packed Linears cannot carry adapter hooks; "
                           "close() the LoRA first (merge() it to keep its effect), or decode without packing")
    ok, reason = packing_supported(next(model.parameters()).device)
    if not ok:
        raise RuntimeError(f"cannot pack Linears: {reason}")
    model.eval().requires_grad_(False)
    for block in model.transformer.h:  # each block's q, k, v as one packed matrix (the attention reads c_qkv)
        attn = block.attn
        w = torch.cat([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight])
        qkv = nn.Linear(w.size(1), w.size(0), bias=False, device="meta")
        qkv.weight = nn.Parameter(w, requires_grad=False)
        attn.c_qkv = PackedLinear(qkv, rows_hint)
        del attn.c_q, attn.c_k, attn.c_v
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, m in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, PackedLinear(m, rows_hint))
    # q and k are now bf16, and the rotary casts its tables to their dtype in every layer: cast them once
    # (the same rounding, 16 small kernels fewer per d8 decode step)
    model.cos, model.sin = model.cos.to(torch.bfloat16), model.sin.to(torch.bfloat16)
    model.compute_dtype = torch.float32  # the packed Linears are the bf16 part: no autocast around them
    return model
