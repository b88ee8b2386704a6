"""nanochat's GPT as a transformers model, for an export whose model uses what transformers' NanoChat cannot
express: copied beside the weights, named in config.json's auto_map and loaded with
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True). Self-contained (torch and transformers
only), with nanochat's parameter names and rotary convention, so the weights go out exactly as trained.

It computes what nanochat/gpt.py computes: token embedding, RMSNorm (no weights) after it and before every
attention, MLP and the head; rotary embeddings (base rope_base), then RMSNorm on q and k; grouped-query
attention with its logits times qk_gain; value embeddings (value_embeds: on every other layer, the last
included, a per-token table added to v through a gate on the block input's first 12 channels); ReLU^2 MLP of
width 4x; untied head; logits softcapped in fp32.
SUPPORTED_FIELDS lists the GPTConfig fields it implements: a feature added to gpt.py is exported through
this file once it is implemented here and listed.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

SUPPORTED_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "softcap", "qk_gain",
                    "rope_base", "value_embeds")
VE_GATE_CHANNELS = 12  # nanochat/gpt.py's: the value-embedding gate reads this many channels of the block input
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class NanoChatGPTConfig(PretrainedConfig):
    model_type = "nanochat_gpt"
    # the names generation and device-placement code look for
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}

    def __init__(self, sequence_len=1024, vocab_size=50304, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                 softcap=15.0, qk_gain=1.0, rope_base=10000.0, value_embeds=False, **kwargs):
        self.sequence_len, self.vocab_size, self.n_layer = sequence_len, vocab_size, n_layer
        self.n_head, self.n_kv_head, self.n_embd = n_head, n_kv_head, n_embd
        self.softcap, self.qk_gain, self.rope_base = softcap, qk_gain, rope_base
        self.value_embeds = value_embeds
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_value_embed(layer_idx, n_layer):
    """Whether a layer owns a value-embedding table: every other layer, the last one included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def rotate(x, cos, sin):
    """nanochat's rotary: the pair (x[i], x[i + D/2]) turned by +angle. x (B, T, H, D), cos/sin (B, T, 1, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.n_head, self.n_kv_head = layer_idx, config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        # softmax(qk_gain * q.k / sqrt(head_dim)) over the normed q, k; None: SDPA's own 1 / sqrt(head_dim)
        self.scale = None if config.qk_gain == 1.0 else config.qk_gain / self.head_dim ** 0.5
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = None
        if config.value_embeds and has_value_embed(layer_idx, config.n_layer):
            self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, config.n_embd), self.n_kv_head, bias=False)

    def forward(self, x, cos, sin, cache, mask, ve=None):
        B, T, C = x.shape
        q = norm(rotate(self.c_q(x).view(B, T, self.n_head, self.head_dim), cos, sin)).transpose(1, 2)
        k = norm(rotate(self.c_k(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin)).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # a gate in (0, 3) per kv head and token, as in nanochat/gpt.py
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if k.size(1) != q.size(1):  # grouped-query attention: each kv head serves n_head / n_kv_head query heads
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # no mask (no padding): causal, or one new token that sees everything cached
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.size(2) > 1,
                                           scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache, mask, ve=None):
        x = x + self.attn(norm(x), cos, sin, cache, mask, ve)
        return x + self.mlp(norm(x))


def build_mask(pad_mask, past, T, device):
    """None when SDPA's own causal rule is right (no padding, and no cached prefix or one new token); else
    (B or 1, 1, T, past + T) bool, True = attend: keys up to the query's own slot that are not padding. A
    padded query still sees itself, so no row is empty (an empty row gives NaN, and NaN values leak into real
    rows through zero attention weights)."""
    no_pad = pad_mask is None or bool(pad_mask.all())
    if no_pad and (past == 0 or T == 1):
        return None
    slots = torch.arange(past + T, device=device)
    own = past + torch.arange(T, device=device)
    mask = (slots[None, :] <= own[:, None])[None, None]
    if not no_pad:
        keep = pad_mask[:, None, None, :past + T].bool().to(device)
        mask = (mask & keep) | (slots[None, :] == own[:, None])[None, None]
    return mask


class NanoChatGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.value_embeds:
            kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                               for i in range(config.n_layer) if has_value_embed(i, config.n_layer)})
        self.post_init()

    def _init_weights(self, module):
        # fresh models only (from_pretrained overwrites every weight): nanochat's init
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features ** -0.5)

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True) and not self.training
        if use_cache and cache is None:
            cache = DynamicCache()
        if self.config.value_embeds and input_ids is None:
            raise ValueError("this model's value embeddings look up token ids: pass input_ids, not inputs_embeds")
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                                                  device=x.device) / head_dim))
        angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2), as nanochat's tables
        cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
        mask = build_mask(attention_mask, past, T, x.device)
        x = norm(x)
        for i, block in enumerate(self.transformer.h):
            ve = self.value_embeds[str(i)](input_ids) if block.attn.ve_gate is not None else None
            x = block(x, cos, sin, cache, mask, ve)
        if logits_to_keep:
            x = x[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else x[:, logits_to_keep]
        logits = self.lm_head(norm(x)).float()
        cap = self.config.softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:  # transformers' convention: labels line up with the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
