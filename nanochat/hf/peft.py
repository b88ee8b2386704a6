"""One of our LoRA adapters in PEFT's layout (adapter_config.json + adapter_model.safetensors), to load with
peft.PeftModel.from_pretrained onto the exported model; which adapter and which base is export.py's call.

Our LoRA and PEFT's compute the same update: W x + (alpha / r) B A x, A (r x in), B (out x r), so A and B go
out as they are, under the exported model's module names, with PEFT's scaling (lora_alpha / r, no rsLoRA).
For the native layout the q and k rows of B are sign-flipped like the base weights (convert.py explains why).
What PEFT has no place for stays behind: the router centroid, our task and metrics (they go in the card).
"""
import os

from nanochat.hf.convert import BLOCK_NAMES, flip_rotary, hf_block_name


def peft_tensors(adapter, config, layout):
    """adapter (nanochat.lora.Adapter) -> {PEFT key: tensor} for the exported model's module names."""
    head_dim = config.n_embd // config.n_head
    out = {}
    for key, i in adapter.index.items():  # key: "h.<layer>.<attn|mlp>.<name>"
        ours = f"transformer.{key}.weight"
        module = (hf_block_name(ours) if layout == "native" else ours).removesuffix(".weight")
        A, B = adapter.A[i].detach().float().cpu(), adapter.B[i].detach().float().cpu()
        if layout == "native" and key.endswith(("attn.c_q", "attn.c_k")):
            B = flip_rotary(B, head_dim)
        out[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        out[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
    return out


def save_peft_adapter(adapter, config, layout, out_dir, base_model):
    """Write adapter_config.json (peft's own LoraConfig) and adapter_model.safetensors into out_dir."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    targets = [BLOCK_NAMES[t] if layout == "native" else t for t in adapter.targets]
    LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, target_modules=targets, lora_dropout=0.0, bias="none",
               task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True).save_pretrained(out_dir)
    save_file(peft_tensors(adapter, config, layout), os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
