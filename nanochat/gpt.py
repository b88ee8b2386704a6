"""The GPT model.

Design:
- token embedding, untied from the lm_head
- rotary position embeddings (no learned positions)
- QK-norm: parameter-free RMSNorm on q and k
- parameter-free RMSNorm (F.rms_norm) on the embedding output, before attention, before the MLP
  and before the lm_head; no norm has weights, no Linear has a bias
- ReLU^2 MLP of width 4 * n_embd
- grouped-query attention (n_kv_head divides n_head; n_kv_head=1 is multi-query attention)
- logit soft-capping: softcap * tanh(logits / softcap), computed in fp32
- the two output projections of each block (attn.c_proj, mlp.c_proj) start at zero, so every block
  is the identity at init and the loss starts at ~ln(vocab_size)

Optional pieces (GPTConfig fields, off by default; dev/notes_recipe.md has where each comes from and what the
race measured), with the names of the parameters they add:
- value_embeds: layers i with i % 2 == (n_layer - 1) % 2 (every other one, the last included) own a table
  value_embeds[i] (vocab x n_kv_head * head_dim), added to that layer's values per kv head h through a gate:
      v_h = c_v(x)_h + 3 * sigmoid(attn.ve_gate(x[:, :12]))_h * value_embeds[i][token]_h
  (x the block's normed input; the gate's Linear maps its first 12 channels to one logit per kv head)
- resid_scalars: before block i the residual stream h becomes resid_lambdas[i] * h + x0_lambdas[i] * x0, x0 the
  normed embedding; initialised 1.15 -> 1.05 and 0.20 -> 0.05 linearly over the layers, as upstream does
- smear: the normed embedding e_t of each position (before x0 is taken) becomes
      e_t + smear_lambda * sigmoid(smear_gate(e_t[:24])) * e_{t-1}      (e_{-1} = 0 at a sequence start)
  smear_lambda starts at 0 (a no-op); a KV cache keeps each row's last token for the next input's first position
- backout: before the final norm h <- h - backout_lambda * h_mid, h_mid the residual stream after block
  n_layer // 2 (lower-level features the head need not see); backout_lambda starts at 0.2
- window_pattern: a string of S and L tiled over the layers (e.g. "SSSL"), the last layer always L. An L layer
  attends to the whole context; at an S layer a query at position p sees keys p - w .. p, w = sequence_len // 4.
  No parameters. SDPA has no sliding-window kernel: a window is a mask, which saves no work (dev/notes_recipe.md)
- qk_gain: attention weights softmax(qk_gain * q.k / sqrt(head_dim)) over the QK-normed q, k (1 = plain SDPA)
- rope_base: the rotary angles of pair i at position t are t / rope_base^(2i / head_dim)
- embed_init_std, fc_init_scale: the init std of wte, and of mlp.c_fc relative to 1 / sqrt(n_embd)
- polar_express, normuon, muon_weight_decay: options of Muon for the block matrices (nanochat/muon.py)

Build it on the meta device, then `model.to_empty(device=d); model.init_weights()` (what the
training scripts do), or construct it directly on CPU (it then initialises itself).
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanochat.adamw import DistAdamW
from nanochat.kv_cache import KVCache
from nanochat.muon import DistMuon, Muon
from nanochat.softcap_loss import softcap, softcapped_cross_entropy

# F.scaled_dot_product_attention grew `enable_gqa` in torch 2.5; older versions repeat the kv heads.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA); must divide n_head
    n_embd: int = 768
    softcap: float = 15.0  # logits = softcap * tanh(logits / softcap); 0 disables
    # Pieces of nanochat's 2026 recipe, each off here (a checkpoint whose meta lacks a field loads with it off);
    # base_train turns on those the race measured faster to a loss (its RECIPE). Formulas: the module docstring.
    value_embeds: bool = False  # a value-embedding table on alternating layers, mixed into v by a gate
    resid_scalars: bool = False  # learned per-layer scales of the residual stream and of the embedding x0
    smear: bool = False  # each position's embedding takes in some of the previous token's, through a gate
    backout: bool = False  # subtract a learned share of the middle layer's residual before the head
    window_pattern: str = "L"  # per-layer attention span, tiled over the layers: L full context, S a quarter
    qk_gain: float = 1.0  # attention logits q.k / sqrt(head_dim) times this (upstream: 1.2 on q and k, 1.44)
    rope_base: float = 10000.0  # rotary base frequency (upstream: 100000)
    embed_init_std: float = 1.0  # init std of the token embedding (upstream: 0.8)
    fc_init_scale: float = 1.0  # init std of mlp.c_fc is this / sqrt(n_embd) (upstream: 0.4)
    # Muon's variants (nanochat/muon.py), chosen with the model so its checkpoints say how it was trained
    polar_express: bool = False  # per-iteration Polar Express coefficients in the orthogonalisation
    normuon: bool = False  # NorMuon's per-neuron normalisation of the update (second-moment EMA, beta2 0.9)
    muon_weight_decay: float = 0.0  # cautious weight decay of the block matrices, scaled by the LR schedule


def config_overrides(text):
    """'name=value,name=value' (e.g. base_train's --model-options) -> {GPTConfig field: value}, each value
    converted to the field's type; booleans take 1/0, true/false, on/off. Raises ValueError naming what is wrong."""
    fields = {f.name: f.type for f in dataclasses.fields(GPTConfig)}
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or name not in fields:
            raise ValueError(f"model option {item!r}: expected name=value with name one of {', '.join(fields)}")
        kind = fields[name]
        if kind in (bool, "bool"):
            if value.lower() not in ("1", "0", "true", "false", "on", "off"):
                raise ValueError(f"model option {name}={value!r}: expected 1/0, true/false or on/off")
            out[name] = value.lower() in ("1", "true", "on")
        else:
            try:
                out[name] = {"int": int, "float": float, "str": str}.get(kind, kind)(value)
            except ValueError:
                want = getattr(kind, "__name__", kind)
                raise ValueError(f"model option {name}={value!r}: expected a {want}") from None
    return out


VE_GATE_CHANNELS = 12  # the value-embedding gate reads this many channels of the block input
SMEAR_GATE_CHANNELS = 24  # the smear gate reads this many channels of the embedding


def has_value_embed(layer_idx, n_layer):
    """Whether a layer owns a value-embedding table: every other layer, the last one included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Per layer: how many earlier positions a query may attend to (None: all of them). See window_pattern."""
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"window_pattern {config.window_pattern!r}: use the letters S (short) and L (long), e.g. SSSL")
    short = max(1, config.sequence_len // 4)
    sizes = [short if pattern[i % len(pattern)] == "S" else None for i in range(config.n_layer)]
    sizes[-1] = None  # the last layer sees everything
    return sizes


def window_mask(positions, n_keys, window, mask=None):
    """The attention mask (True = attend) of queries at `positions` ((T,) or (B, T) absolute positions) over
    keys 0..n_keys-1 that see only the `window` positions before their own: the causal mask, or `mask` (a
    cache's, (B, 1, T, n_keys)), with the keys further back removed."""
    keys = torch.arange(n_keys, device=positions.device)
    near = keys >= positions[..., None] - window  # (T, n_keys) or (B, T, n_keys)
    if near.ndim == 3:
        near = near[:, None]
    return near & (keys <= positions[..., None] if mask is None else mask)


def norm(x):
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def residual_in_compute_dtype(x, dtype):
    """Whether the residual stream x is carried in the compute dtype rather than the embedding's fp32: on GPUs in
    bf16, where it halves the saved activations (a d20 model at batch 32 x 2048 needs that to fit in 80 GB).
    CPUs keep fp32 sums (bf16 adds are slow there), and fp16's narrow range keeps them fp32 too."""
    return x.is_cuda and dtype == torch.bfloat16


def take_positions(x, at):
    """x (B, T, ...) at one position per row: an int for every row, or a (B,) tensor -> (B, ...)."""
    return x[:, at] if isinstance(at, int) else x[torch.arange(x.size(0), device=x.device), at]


def apply_rotary_emb(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + D/2]) by position-dependent angles. x: (B, T, H, D)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep bf16 activations bf16
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def attention(q, k, v, q_pos, mask=None, scale=None):
    """Causal attention of queries at absolute positions [q_pos, q_pos+Tq) to keys at [0, Tk), Tk = q_pos+Tq.
    With `mask` (B, 1, Tq, Tk; True = attend) the mask alone decides, as rows of a ragged batch need.
    q: (B, H, Tq, D), k/v: (B, H_kv, Tk, D); scale: of the logits (None: 1/sqrt(D)). Returns (B, H, Tq, D)."""
    Tq, Tk = q.size(2), k.size(2)
    # SDPA only: on CUDA it runs its own flash kernel, and unlike the flash-attn package it needs no build
    # and does not break torch.compile's graph at every layer.
    kwargs = {} if scale is None else {"scale": scale}
    if k.size(1) != q.size(1):
        if _SDPA_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
    if Tq == Tk:  # training, or a prefill into an empty cache
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    if Tq == 1:  # one decode step sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    # chunk after a cached prefix: SDPA's is_causal would align top-left, so build the mask explicitly
    mask = torch.arange(Tk, device=q.device)[None, :] <= (q_pos + torch.arange(Tq, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        # the gain rides on SDPA's own scaling: no extra op (None keeps SDPA's default, bit for bit)
        self.scale = None if config.qk_gain == 1.0 else config.qk_gain / self.head_dim ** 0.5
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_qkv = None  # inference only (fastlinear.pack_linears): c_q, c_k, c_v as one matrix
        self.window = window_sizes(config)[layer_idx]  # None: the whole context
        self.fa3 = None  # Flash Attention 3's interface when nanochat.accel.use_fa3 set it (full sequences only)
        self.ve_gate = None
        if config.value_embeds and has_value_embed(layer_idx, config.n_layer):
            self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, config.n_embd), self.n_kv_head, bias=False)

    def forward(self, x, cos, sin, kv_cache=None, ve=None, mask=None):
        """ve: this layer's value embeddings of the input tokens (B, T, n_kv_head * head_dim), or None.
        mask: (..., T, Tk) True = attend, given when this layer's window hides some keys; it replaces the
        causal rule and the cache's own mask."""
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        # Order: rotary, then QK-norm. A rotary rotation preserves each vector's RMS, so the two orders
        # give the same result mathematically; norming last guarantees unit-RMS inputs to the dot product.
        if self.c_qkv is not None:
            # one matmul, and the rotary and the norm over q's and k's heads together: a decode step is
            # bound by the number of small ops, and this drops ~20 per layer (d8 batch 8: ~10% faster)
            qkv = self.c_qkv(x).view(B, T, H + 2 * Hkv, D)
            qk = norm(apply_rotary_emb(qkv[:, :, :H + Hkv], cos, sin)).transpose(1, 2)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, :, H + Hkv:]
        else:
            q = self.c_q(x).view(B, T, H, D)
            k = self.c_k(x).view(B, T, Hkv, D)
            v = self.c_v(x).view(B, T, Hkv, D)
            q = norm(apply_rotary_emb(q, cos, sin)).transpose(1, 2)
            k = norm(apply_rotary_emb(k, cos, sin)).transpose(1, 2)
        if ve is not None:  # (0, 3) per kv head: the model decides per token how much of the table to take
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate.to(v.dtype).unsqueeze(-1) * ve.view(B, T, Hkv, D).to(v.dtype)
        if self.fa3 is not None and kv_cache is None:  # FA3 reads (B, T, H, D) and skips the window's hidden keys
            # (a custom op: autocast does not cast its inputs, and the norm may have left q, k in fp32)
            q, k = q.transpose(1, 2).to(v.dtype), k.transpose(1, 2).to(v.dtype)
            y = self.fa3.flash_attn_func(q, k, v, softmax_scale=self.scale, causal=True,
                                         window_size=(-1 if self.window is None else self.window, 0))
            y = y[0] if isinstance(y, tuple) else y  # some builds also return the softmax's log-sum-exp
            return self.c_proj(y.reshape(B, T, C))
        v = v.transpose(1, 2)  # (B, H, T, D) like q and k
        q_pos = 0
        if kv_cache is not None:
            # a ragged batch (every row its own length) or a static cache: the mask alone says what to attend to
            if mask is None:
                mask = kv_cache.mask
            q_pos = kv_cache.get_pos() if mask is None else 0  # (read before the insert advances it)
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        y = attention(q, k, v, q_pos, mask, self.scale)
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
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None, ve=None, mask=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache, ve, mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.windows = window_sizes(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.value_embeds:
            kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                               for i in range(config.n_layer) if has_value_embed(i, config.n_layer)})
        if config.resid_scalars:  # (values set by init_weights)
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(min(SMEAR_GATE_CHANNELS, config.n_embd), 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        # The dtype the forward computes in; nanochat.common.compute_dtype decides it and whoever builds or loads
        # the model sets it. Weights stay fp32 (the optimizers' masters): bf16/fp16 run as autocast inside forward.
        self.compute_dtype = torch.float32
        # Rotary tables cover 10x the training length so generation can run past it. Non-persistent:
        # they are recomputed by init_weights (after to_empty) and never stored in checkpoints.
        self.rotary_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_len, device=self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    def _rotary_tables(self, seq_len, device):
        head_dim, base = self.config.n_embd // self.config.n_head, self.config.rope_base
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self):
        """(Re)initialise every parameter and the rotary buffers in place (works after to_empty)."""
        # RMSNorm follows, so the scale only sets how far an AdamW step moves a row relative to its size
        nn.init.normal_(self.transformer.wte.weight, std=self.config.embed_init_std)
        nn.init.normal_(self.lm_head.weight, std=0.001)  # near-zero logits: loss starts at ~ln(vocab)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=self.config.fc_init_scale * block.mlp.c_fc.in_features ** -0.5)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:  # small and positive: every gate starts just above 3 * 0.5
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for table in getattr(self, "value_embeds", {}).values():  # the scale of c_v's rows, which they add to
            nn.init.normal_(table.weight, std=self.config.n_embd ** -0.5)
        if self.config.smear:  # lambda 0: no smear at init; the gate starts just above sigmoid(0)
            nn.init.zeros_(self.smear_lambda)
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        if self.config.backout:
            nn.init.constant_(self.backout_lambda, 0.2)
        if self.config.resid_scalars:  # early layers lean more on the stream and on the embedding
            depth = torch.linspace(0, 1, self.config.n_layer) if self.config.n_layer > 1 else torch.zeros(1)
            self.resid_lambdas.copy_(1.15 - 0.10 * depth)
            self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        cos, sin = self._rotary_tables(self.rotary_len, device=self.lm_head.weight.device)
        self.cos, self.sin = cos, sin

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        """All parameters, embedding tables included."""
        return sum(p.numel() for p in self.parameters())

    def num_lookup_params(self):
        """Parameters read by lookup, not by a matmul: the token embedding and any value-embedding tables."""
        return sum(p.numel() for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters())

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward), the convention used for MFU.

        6 * N, N = parameters of every matmul (all of them except the embedding tables, which are lookups;
        the lm_head counts): forward 2 FLOPs per multiply-add, backward twice that.
        Plus attention scores and weighted values: per layer and token, q.k over seq_len keys and p.v over
        seq_len values = 2 * 2 * n_embd * seq_len forward, x3 for forward + backward, i.e.
        12 * n_layer * n_embd * seq_len. It is not halved for causality, and it uses n_head * head_dim =
        n_embd (GQA shares k/v projections but not the score computation). Norms, rotary, activations,
        softcap and the softmax are not counted. A windowed layer counts the window's keys, not seq_len: the FLOPs a
        kernel that skips the hidden keys does (SDPA with a mask does them all).
        """
        c = self.config
        n_matmul = self.num_params() - self.num_lookup_params()
        keys = sum(c.sequence_len if w is None else min(w + 1, c.sequence_len) for w in self.windows)
        return 6 * n_matmul + 12 * c.n_embd * keys

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
        """{"adamw": AdamW for the embeddings, lm_head and the recipe's scalars, "muon": Muon for every 2-D block
        matrix}. The AdamW learning rates of the tables are scaled by (n_embd/768)^-0.5; the recipe's scalars use
        scalar_lr (upstream's groups and rates). Under torch.distributed the sharded variants are used; they also
        average gradients across ranks (no DDP wrapper needed). Each group records `initial_lr` for LR schedules."""
        matrix_params = [p for p in self.transformer.h.parameters() if p.requires_grad]
        assert all(p.ndim == 2 for p in matrix_params)
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * scale),
        ]
        if self.config.value_embeds:  # half the token embedding's rate, as upstream tuned it
            adam_groups.append(dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * scale * 0.5))
        if self.config.resid_scalars:  # a multiplier compounds over the layers: it gets 1/100 of the additive's rate
            adam_groups += [dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01, weight_decay=0.0),
                            dict(params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0)]
        gates = [p for name in ("smear_gate", "smear_lambda", "backout_lambda") if hasattr(self, name)
                 for p in ([getattr(self, name)] if name.endswith("lambda") else getattr(self, name).parameters())]
        if gates:  # upstream's fixed rate for its smear (and backout) scalars
            adam_groups.append(dict(params=gates, lr=0.2, weight_decay=0.0))
        grouped = [p for g in adam_groups for p in g["params"]] + matrix_params
        assert len(grouped) == len({id(p) for p in grouped}) and \
            {id(p) for p in self.parameters() if p.requires_grad} <= {id(p) for p in grouped}, \
            "every trainable parameter must be in exactly one optimizer group"
        adam_kwargs = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        c = self.config
        muon_kwargs = dict(lr=matrix_lr, momentum=0.95, polar_express=c.polar_express,
                           normuon_beta2=0.9 if c.normuon else 0.0, weight_decay=c.muon_weight_decay)
        if dist.is_available() and dist.is_initialized():
            adamw, muon = DistAdamW(adam_groups, **adam_kwargs), DistMuon(matrix_params, **muon_kwargs)
        else:
            fused = self.get_device().type == "cuda"
            adamw = torch.optim.AdamW(adam_groups, **adam_kwargs, fused=fused)
            muon = Muon(matrix_params, **muon_kwargs)
        optimizers = {"adamw": adamw, "muon": muon}
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def _embed(self, idx):
        """The normed token embedding, the start of the residual stream."""
        x = self.transformer.wte(idx)
        if residual_in_compute_dtype(x, self.compute_dtype):
            x = x.to(self.compute_dtype)
        return norm(x)

    def _smear(self, x, idx, kv_cache):
        """Mix the previous position's embedding into each one (formula: module docstring). Under a cache the
        first input position's predecessor is the cache's last token of that row."""
        first = torch.zeros_like(x[:, :1])
        if kv_cache is not None:
            before = kv_cache.prev_tokens(idx)
            first = torch.where((before >= 0)[:, None, None], self._embed(before.clamp(min=0)[:, None]), first)
        prev = torch.cat([first, x[:, :-1]], dim=1)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :self.smear_gate.in_features]))
        return x + gate.to(x.dtype) * prev

    def _window_masks(self, t0, T, kv_cache, device):
        """{window: the mask of the layers with that window} for this input, built once per forward and only for
        windows that hide a key from some query (a prefill shorter than the window needs none)."""
        masks = {}
        for w in {w for w in self.windows if w is not None}:
            if isinstance(t0, int):  # one start for every row: causal from t0, keys 0 .. t0+T-1
                if t0 + T - 1 > w:
                    masks[w] = window_mask(t0 + torch.arange(T, device=device), t0 + T, w)
            else:  # per-row positions and the cache's own mask over its Tk keys
                masks[w] = window_mask(t0, kv_cache.Tk, w, kv_cache.mask)
        return masks

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_at=None):
        """idx: (B, T) token ids. Returns fp32 logits (B, T, V) when targets is None, else the
        cross-entropy (targets == -1 ignored): a scalar for "mean"/"sum", per-token losses of shape
        (B, T) for "none" (0 at ignored positions). With kv_cache, idx continues the cached sequence.
        logits_at: one position per row (an int for all rows, or a (B,) tensor) -> logits (B, V) there only:
        a prefill samples from one position, and the lm_head and softcap over every prompt position cost
        ~15% of its forward (more with a large vocabulary). Computes in self.compute_dtype."""
        if self.compute_dtype == torch.float32:
            return self._forward(idx, targets, kv_cache, loss_reduction, logits_at)
        with torch.autocast(idx.device.type, dtype=self.compute_dtype):
            return self._forward(idx, targets, kv_cache, loss_reduction, logits_at)

    def _forward(self, idx, targets, kv_cache, loss_reduction, logits_at):
        B, T = idx.shape
        t0 = 0 if kv_cache is None else kv_cache.positions(T, idx.device)  # an int, or a tensor (nanochat/kv_cache.py)
        if isinstance(t0, torch.Tensor):  # positions as a tensor (B, T) or (T,): rotary angles gathered
            assert kv_cache.Tk <= self.rotary_len, f"sequence length exceeds the rotary table ({self.rotary_len})"
            cos, sin = self.cos[0, t0], self.sin[0, t0]  # (B, T, 1, D/2) or (T, 1, D/2)
        else:
            assert t0 + T <= self.rotary_len, f"sequence length {t0 + T} exceeds the rotary table ({self.rotary_len})"
            cos, sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]
        x = self._embed(idx)
        if self.config.smear:
            x = self._smear(x, idx, kv_cache)
        x0 = x
        masks = self._window_masks(t0, T, kv_cache, idx.device)
        for i, block in enumerate(self.transformer.h):
            if self.config.resid_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if block.attn.ve_gate is not None else None
            x = block(x, cos, sin, kv_cache, ve, masks.get(self.windows[i]))
            if self.config.backout and i == self.config.n_layer // 2:
                mid = x
        if self.config.backout:
            x = x - self.backout_lambda.to(x.dtype) * mid
        if logits_at is not None:
            x = take_positions(x, logits_at)
        logits = self.lm_head(norm(x))
        cap = self.config.softcap
        if targets is None:
            return softcap(logits, cap) if cap else logits.float()
        logits, targets = logits.view(-1, logits.size(-1)), targets.reshape(-1)
        if cap:  # its own backward: the loss head fuses into one pass each way (nanochat/softcap_loss.py)
            loss = softcapped_cross_entropy(logits, targets, cap, reduction=loss_reduction)
        else:
            loss = F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    @torch.no_grad()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Simple single-sequence sampler with a KV cache: yields max_tokens new token ids.
        (The Engine in engine.py does batched sampling and tool use.)"""
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        c = self.config
        cache = KVCache(1, c.n_kv_head, len(tokens) + max_tokens, c.n_embd // c.n_head, c.n_layer)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids, kv_cache=cache)[:, -1, :]
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                ids = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=rng)
            else:
                ids = logits.argmax(dim=-1, keepdim=True)
            yield ids.item()
