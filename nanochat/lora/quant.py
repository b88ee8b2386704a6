"""Weight-only quantization of a GPT's weights (block Linears, token embedding, lm_head) to int8 or 4 bits: a
frozen base 4x (int8) or ~7x (4-bit) smaller than fp32 that LoRA adapters train and serve on, QLoRA's idea at our
scale; it touches no training code, and a quantized model is for adapters and inference only (no full fine-tuning).

    quantize_base(model)                    # before LoRA(model): the adapters are then bound to the quantized base
    quantize_base(model, bits=4)            # 4-bit groups of 64 along the input dim, normal-quantile levels
    lora = LoRA(model)                      # hooks Int8Linear / Int4Linear exactly as it hooks nn.Linear

Int8: each weight row (one output channel) is stored as int8 with one fp32 scale, absmax / 127 (symmetric,
per channel: an outlier only coarsens its own row). 4-bit (Int4Linear): each group of `group_size` weights
along a row has one scale (its absmax, fp16 by default) and each weight is a 4-bit index into 16 levels in
[-1, 1], two indices per byte. "nf4" levels are quantiles of a normal distribution (trained weights are
close to normal, so the levels sit where the weights are: 23-33% less squared error than "int4", -7..7 / 7,
evenly spaced, on a trained d4). Int8 is exactly half of bf16: only sub-8-bit weights are > 2x below bf16.

Each forward dequantizes the layer's weight for one ordinary matmul: memory at rest is int8 / 4-bit, and
the speed cost is the dequantization (measured -5% int8, -15% 4-bit on CPU at d4). (torch's int8 CPU
kernel, _weight_int8pack_mm, measured 7x (bf16) to 260x (fp32) slower than this here.) The embedding
table is quantized per row too (Int8Embedding, Int4Embedding), and a lookup dequantizes only the rows it
gathers; the lm_head is one more quantized Linear. (quantize_blocks leaves both in full precision.)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK_LINEARS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class Int8Linear(nn.Module):
    """A bias-free Linear whose weight is int8 (out x in) times a per-output-channel fp32 scale."""

    def __init__(self, linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear quantizes bias-free Linears only (the GPT's have no bias)")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # buffers, not parameters: the quantized base is frozen, and they still travel with .to() and state_dict
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantize(self, dtype=torch.float32):
        return self.weight.to(dtype) * self.scale[:, None].to(dtype)

    def forward(self, x):
        # the full-precision weight exists only for this matmul (one layer at a time)
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Int8Embedding(nn.Module):
    """An Embedding whose table is int8 (vocab x dim) times a per-row fp32 scale: a lookup gathers the int8
    rows and their scales and dequantizes only those, in the table's original dtype."""

    def __init__(self, embedding):
        super().__init__()
        w = embedding.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.num_embeddings, self.embedding_dim = w.shape
        self.dtype = embedding.weight.dtype  # what the model downstream expects from its embedding
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, idx):
        return (self.weight[idx].to(torch.float32) * self.scale[idx].unsqueeze(-1)).to(self.dtype)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


def _levels(fmt):
    """The 16 sorted levels in [-1, 1] a 4-bit index points at (a group's values are level x its scale)."""
    if fmt == "int4":
        return torch.arange(-8, 8, dtype=torch.float32) / 7  # index 0 (-8/7) is never the nearest: 15 in use
    if fmt == "nf4":
        # quantiles of a standard normal: 8 above zero, 7 below and an exact 0 (a zero weight, e.g. a freshly
        # initialised projection, stays zero), the outer ones at the 5% tails, scaled to [-1, 1] (of 0.88-0.98,
        # 0.95 gave the least squared error on normal groups of 128, within 2.5% of the best, 0.93, at 32 and 64)
        normal = torch.distributions.Normal(0.0, 1.0)
        pos = normal.icdf(torch.linspace(0.5, 0.95, 9)[1:])
        neg = -normal.icdf(torch.linspace(0.5, 0.95, 8)[1:])
        return torch.cat((neg, torch.zeros(1), pos)).sort().values / pos.max()
    raise ValueError(f"unknown 4-bit format {fmt!r}; choose 'nf4' (normal quantiles) or 'int4' (evenly spaced)")


def pack4(codes):
    """(..., n) integers in 0..15, n even -> (..., n / 2) uint8: element 2j in the low nibble, 2j + 1 in the high."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def _quantize4(w, group_size, levels, scale_dtype):
    """w (rows x n) -> (packed (rows x n/2) uint8, scale (rows x n/group_size)): each weight's nearest level."""
    groups = w.float().view(w.size(0), -1, group_size)
    # the scale as stored (fp16 rounds it) is the one the indices are chosen against; a group of zeros gets the
    # smallest normal scale instead of 0, so nothing divides by zero
    tiny, big = torch.finfo(scale_dtype).tiny, torch.finfo(scale_dtype).max
    absmax = groups.abs().amax(dim=-1)
    if absmax.max() > big:
        raise ValueError(f"a weight of magnitude {absmax.max().item():.3g} overflows {scale_dtype} scales; "
                         f"pass scale_dtype=torch.float32")
    scale = absmax.clamp(min=tiny).to(scale_dtype)
    mids = (levels[1:] + levels[:-1]) / 2  # the boundaries between neighbouring levels
    codes = torch.bucketize(groups / scale.float().unsqueeze(-1), mids.to(w.device))
    return pack4(codes.view(w.shape)), scale


def _dequantize4(packed, scale, levels, dtype):
    """packed (..., n/2) uint8 and scale (..., groups) -> the weights (..., n) in dtype."""
    b = torch.arange(256, device=packed.device)
    pairs = levels.to(dtype)[torch.stack((b & 15, b >> 4), dim=-1)]  # byte -> its two levels: one gather per byte
    # index_select, not pairs[packed]: advanced indexing measured 3x slower on CPU
    w = pairs.index_select(0, packed.flatten().int()).view(*scale.shape, -1)  # (..., groups, group_size)
    return (w * scale.to(dtype).unsqueeze(-1)).flatten(-2)


def _check4(n, group_size, what):
    if n % 2:
        raise ValueError(f"4-bit packs two values per byte along {what}, which must be even (it is {n})")
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size {group_size} does not divide {what} ({n}); pick a divisor such as 32 or 64")


class Int4Linear(nn.Module):
    """A bias-free Linear whose weight is 4-bit: each group of group_size inputs of a row has one scale, each
    weight an index into 16 levels (fmt "nf4" or "int4"), two indices per byte (out x in/2 uint8)."""

    def __init__(self, linear, group_size=64, fmt="nf4", scale_dtype=torch.float16):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int4Linear quantizes bias-free Linears only (the GPT's have no bias)")
        _check4(linear.in_features, group_size, "in_features")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size, self.fmt = group_size, fmt
        levels = _levels(fmt).to(linear.weight.device)
        packed, scale = _quantize4(linear.weight.detach(), group_size, levels, scale_dtype)
        # buffers, not parameters: the quantized base is frozen, and they still travel with .to() and state_dict
        self.register_buffer("weight", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("levels", levels)  # 64 bytes; in the state_dict, so a checkpoint says its format

    def dequantize(self, dtype=torch.float32):
        return _dequantize4(self.weight, self.scale, self.levels, dtype)

    def forward(self, x):
        # the full-precision weight exists only for this matmul (one layer at a time)
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt} weight-only, "
                f"groups of {self.group_size}, {self.scale.dtype} scales")


class Int4Embedding(nn.Module):
    """An Embedding whose rows are 4-bit like Int4Linear's (groups along the embedding dim): a lookup gathers
    the packed rows and their scales and dequantizes only those, in the table's original dtype."""

    def __init__(self, embedding, group_size=64, fmt="nf4", scale_dtype=torch.float16):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        _check4(self.embedding_dim, group_size, "embedding_dim")
        self.group_size, self.fmt = group_size, fmt
        self.dtype = embedding.weight.dtype  # what the model downstream expects from its embedding
        levels = _levels(fmt).to(embedding.weight.device)
        packed, scale = _quantize4(embedding.weight.detach(), group_size, levels, scale_dtype)
        self.register_buffer("weight", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("levels", levels)

    def forward(self, idx):
        return _dequantize4(self.weight[idx], self.scale[idx], self.levels, torch.float32).to(self.dtype)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.fmt} groups of {self.group_size}"


def _classes(bits, opts):
    """-> (the Linear class, the Embedding class) of bits; opts (group_size, fmt, scale_dtype) are for bits=4."""
    if bits == 8:
        if opts:
            raise ValueError(f"{sorted(opts)} are options of bits=4; int8 has one scale per row and no options")
        return Int8Linear, Int8Embedding
    if bits == 4:
        return Int4Linear, Int4Embedding
    raise ValueError(f"bits must be 8 or 4, not {bits!r}")


def _swap(parent, child, cls, opts, sizes):
    """Replace parent.child with cls(parent.child, **opts) unless it already is one, adding the weight bytes
    before and after (every buffer of the new module: packed weights, scales, levels) to sizes."""
    old = getattr(parent, child)
    if isinstance(old, cls):
        return
    if isinstance(old, (Int8Linear, Int8Embedding, Int4Linear, Int4Embedding)):
        raise ValueError(f"{child} is already a {type(old).__name__}; quantize a full-precision model to get "
                         f"{cls.__name__} (quantized weights do not requantize without loss)")
    new = cls(old, **opts)
    setattr(parent, child, new)
    sizes["fp_bytes"] += old.weight.numel() * old.weight.element_size()
    sizes["quant_bytes"] += weight_bytes(new)


def quantize_base(model, embedding=True, lm_head=True, bits=8, **opts):
    """quantize_blocks, and the token embedding and the lm_head unless told not to: every weight matrix of the
    GPT int8 (bits=8) or 4-bit (bits=4; opts: group_size=64, fmt="nf4" or "int4", scale_dtype=torch.float16).
    -> {"fp_bytes", "quant_bytes"} of everything replaced."""
    linear, emb = _classes(bits, opts)
    sizes = quantize_blocks(model, bits=bits, **opts)
    if embedding:
        _swap(model.transformer, "wte", emb, opts, sizes)
    if lm_head:
        _swap(model, "lm_head", linear, opts, sizes)
    return sizes


def quantize_blocks(model, targets=BLOCK_LINEARS, bits=8, **opts):
    """Replace the target Linears of every block with Int8Linear (bits=8) or Int4Linear (bits=4, opts as in
    quantize_base), in place, and freeze the model. -> {"fp_bytes", "quant_bytes"}: weight bytes of the
    replaced layers before (their dtype) and after (packed weights + scales)."""
    linear, _ = _classes(bits, opts)
    if getattr(model, "_lora", None) is not None:
        raise RuntimeError("quantize the base before attaching a LoRA (adapters are bound to the exact base weights)")
    sizes = {"fp_bytes": 0, "quant_bytes": 0}
    for block in model.transformer.h:
        for t in targets:
            parent_name, _, child = t.rpartition(".")
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, child)
            if not isinstance(lin, (nn.Linear, Int8Linear, Int4Linear)):
                raise ValueError(f"{t} is a {type(lin).__name__}, not an nn.Linear")
            _swap(parent, child, linear, opts, sizes)
    model.requires_grad_(False)
    return sizes


def weight_bytes(model):
    """Bytes of every parameter and buffer of the model (what its weights take in memory)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
