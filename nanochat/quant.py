"""Int8 weight-only quantization of a GPT's weights (block Linears, token embedding, lm_head): a frozen base
about 4x smaller than fp32 (2x than bf16) that LoRA adapters train and serve on, QLoRA's idea at our scale;
it touches no training code, and a quantized model is for adapters and inference only (no full fine-tuning).

    quantize_base(model)            # before LoRA(model): the adapters are then bound to the int8 base
    lora = LoRA(model)              # hooks the Int8Linear modules exactly as it hooks nn.Linear

Each weight row (one output channel) is stored as int8 with one fp32 scale, absmax / 127 (symmetric,
per channel: an outlier only coarsens its own row). Each forward dequantizes the layer's weight for
one ordinary matmul: memory at rest is int8, speed is close to the full-precision layer's. (torch's
int8 CPU kernel, _weight_int8pack_mm, measured 7x (bf16) to 260x (fp32) slower than this here.)
The embedding table is int8 per row too (Int8Embedding), and a lookup dequantizes only the rows it
gathers; the lm_head is one more Int8Linear. (quantize_blocks leaves both in full precision.)
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


def _swap(parent, child, make):
    """Replace parent.child with make(parent.child) -> (bytes before, bytes after) of its weight."""
    old = getattr(parent, child)
    new = make(old)
    setattr(parent, child, new)
    return old.weight.numel() * old.weight.element_size(), new.weight.numel() + new.scale.numel() * new.scale.element_size()


def quantize_base(model, embedding=True, lm_head=True):
    """quantize_blocks, and the token embedding (Int8Embedding) and the lm_head (Int8Linear) unless told not
    to: every weight matrix of the GPT int8. -> {"fp_bytes", "int8_bytes"} of everything replaced."""
    sizes = quantize_blocks(model)
    if embedding and not isinstance(model.transformer.wte, Int8Embedding):
        before, after = _swap(model.transformer, "wte", Int8Embedding)
        sizes["fp_bytes"] += before
        sizes["int8_bytes"] += after
    if lm_head and not isinstance(model.lm_head, Int8Linear):
        before, after = _swap(model, "lm_head", Int8Linear)
        sizes["fp_bytes"] += before
        sizes["int8_bytes"] += after
    return sizes


def quantize_blocks(model, targets=BLOCK_LINEARS):
    """Replace the target Linears of every block with Int8Linear, in place, and freeze the model.
    -> {"fp_bytes", "int8_bytes"}: weight bytes of the replaced layers before (their dtype) and after
    (int8 + scales)."""
    if getattr(model, "_lora", None) is not None:
        raise RuntimeError("quantize the base before attaching a LoRA (adapters are bound to the exact base weights)")
    before = after = 0
    for block in model.transformer.h:
        for t in targets:
            parent_name, _, child = t.rpartition(".")
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, child)
            if isinstance(lin, Int8Linear):
                continue
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"{t} is a {type(lin).__name__}, not an nn.Linear")
            b, a = _swap(parent, child, Int8Linear)
            before, after = before + b, after + a
    for p in model.parameters():
        p.requires_grad_(False)
    return {"fp_bytes": before, "int8_bytes": after}


def weight_bytes(model):
    """Bytes of every parameter and buffer of the model (what its weights take in memory)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
