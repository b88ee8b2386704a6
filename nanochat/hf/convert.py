"""Our GPT's config and weights in transformers' terms and back: parameter names, the rotary sign, which
config fields transformers' NanoChat can express, and whether an export needs our own modeling file;
reading and writing folders is export.py's and import_.py's business.

Two layouts. "native": transformers' NanoChatForCausalLM (model_type "nanochat"), which has everything our
GPT has today: untied embedding, RoPE then QK-norm, parameter-free RMSNorm (also right after the embedding),
ReLU^2 MLP of width 4x, GQA, no biases, final logit softcap. "remote": our own modeling file
(nanochat/hf/modeling_nanochat_gpt.py, shipped in the folder with `auto_map`, loaded with
trust_remote_code=True) with our parameter names, for a model using something NanoChat cannot express.
choose_layout picks: native whenever every GPTConfig field is one NanoChat expresses (NATIVE_FIELDS) or
sits at a value that switches its feature off (NEUTRAL_VALUES); else remote when the modeling file
implements every field (its SUPPORTED_FIELDS); else the export is refused, naming the field. A feature
added to gpt.py is therefore exported once it is added to the modeling file, and natively once it is
listed in NEUTRAL_VALUES at its "off" value.

The rotary sign. Ours rotates each pair (x1, x2) of a head by +angle: (x1 cos - x2 sin, x1 sin + x2 cos);
transformers' NanoChat (like Karpathy's nanochat) by -angle. Negating the second half of every q and k head
maps one onto the other exactly: the rotation by -angle is F R(+angle) F with F that negation, and F
changes neither the RMS norm nor q.k. So the q and k rows are negated on the way out and back in.
"""
import dataclasses

import torch

from nanochat.gpt import GPTConfig

ROPE_THETA = 10000.0  # the base of GPT._rotary_tables at GPTConfig's default rope_base
# GPTConfig fields transformers' NanoChat expresses, and the values of other fields that leave the model
# NanoChat-shaped (a recipe piece switched off: nanochat/gpt.py's docstring has each piece's formula).
NATIVE_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "softcap")
NEUTRAL_VALUES = {"value_embeds": False, "resid_scalars": False, "smear": False, "backout": False,
                  "window_pattern": "L", "qk_gain": 1.0, "rope_base": ROPE_THETA}
# Fields that say how the weights were initialised and trained, not what the forward computes: any value exports.
TRAINING_FIELDS = ("embed_init_std", "fc_init_scale", "polar_express", "normuon", "muon_weight_decay")
BLOCK_NAMES = {  # ours -> transformers' NanoChat, inside a block
    "attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
# F.rms_norm with no eps uses the dtype's machine epsilon; written into config.json so transformers' RMSNorm
# (x * rsqrt(mean(x^2) + eps)) matches ours on fp32 weights
NORM_EPS = torch.finfo(torch.float32).eps
MAX_IMPORT_EPS = 1e-5  # a larger eps changes small activations enough to matter: refused rather than approximated
# GPT keeps rotary tables for 10x its context: past this a config would make the checkpoint unloadable
MAX_CONTEXT = 131072


class ConversionError(ValueError):
    """What cannot be mapped between our GPT and a transformers model; the message names the file and the fix."""


def choose_layout(config, native_fields=NATIVE_FIELDS, neutral=NEUTRAL_VALUES, remote_fields=None, remote=False):
    """"native" or "remote" for a GPTConfig (see the module docstring); ConversionError when neither can
    express it. remote_fields: what the modeling file implements (default: its SUPPORTED_FIELDS); remote: the
    caller asks for our modeling file, which must still implement every piece the model has on."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in TRAINING_FIELDS}
    neutral = {**NEUTRAL_VALUES, **neutral}  # a caller's values add to (or change) the known "off" values
    beyond = [k for k, v in fields.items() if k not in native_fields and neutral.get(k, object()) != v]
    if not beyond and not remote:
        return "native"
    if remote_fields is None:  # the modeling file imports transformers, an optional extra: only when needed
        from nanochat.hf.modeling_nanochat_gpt import SUPPORTED_FIELDS as remote_fields
    missing = [k for k in beyond if k not in remote_fields]
    if missing:
        raise ConversionError(
            f"the model uses {', '.join(f'{k}={fields[k]!r}' for k in missing)}, which neither transformers' "
            "NanoChat nor nanochat/hf/modeling_nanochat_gpt.py implements: add it to that modeling file (and its "
            "SUPPORTED_FIELDS) so the export can ship it")
    return "remote"


def hf_block_name(key):
    """Our parameter name -> transformers' NanoChat name (KeyError for a name NanoChat has no place for)."""
    if key == "transformer.wte.weight":
        return "model.embed_tokens.weight"
    if key == "lm_head.weight":
        return key
    parts = key.split(".")  # transformer.h.<i>.<attn|mlp>.<name>.weight
    if len(parts) == 6 and parts[:2] == ["transformer", "h"] and parts[5] == "weight":
        return f"model.layers.{parts[2]}.{BLOCK_NAMES[parts[3] + '.' + parts[4]]}.weight"
    raise KeyError(key)


def expected_names(config):
    """Our parameter names for a GPTConfig, in state_dict order."""
    names = ["transformer.wte.weight"]
    for i in range(config.n_layer):
        names += [f"transformer.h.{i}.{t}.weight" for t in BLOCK_NAMES]
    return names + ["lm_head.weight"]


def flip_rotary(w, head_dim):
    """Negate the second half of every head's rows of a q or k projection (out, in): its own inverse."""
    w = w.clone()
    w.view(-1, head_dim, w.size(-1))[:, head_dim // 2:] *= -1
    return w


def is_rotary_projection(name):
    return name.endswith(("attn.c_q.weight", "attn.c_k.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight"))


def to_native_state(state, config):
    """Our state_dict -> transformers' NanoChat names, q and k rows sign-flipped; refuses unknown weights."""
    unknown = sorted(set(state) - set(expected_names(config)))
    if unknown:
        raise ConversionError(f"the model has weights transformers' NanoChat has no place for: {unknown[:4]}: "
                              "export it with our modeling file (--remote-code) once that file implements them")
    head_dim = config.n_embd // config.n_head
    return {hf_block_name(k): flip_rotary(v, head_dim) if is_rotary_projection(k) else v for k, v in state.items()}


def from_native_state(tensors, config):
    """transformers' NanoChat tensors (name -> tensor) -> our state_dict (names, rotary sign)."""
    head_dim = config.n_embd // config.n_head
    state = {ours: tensors[hf_block_name(ours)] for ours in expected_names(config)}
    return {k: flip_rotary(v, head_dim) if is_rotary_projection(k) else v for k, v in state.items()}


def native_config(config, tokenizer):
    """NanoChatConfig keyword arguments for a GPTConfig and our tokenizer's special ids."""
    S = tokenizer.encode_special
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=4 * config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.sequence_len, hidden_act="relu2", rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        final_logit_softcapping=float(config.softcap) if config.softcap else None, attention_bias=False,
        attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=S("<|bos|>"),
        eos_token_id=S("<|assistant_end|>"), pad_token_id=S("<|assistant_end|>"),
    )


# --- importing: a config.json -> GPTConfig ---------------------------------------------------------

def _known_nanochat_keys():
    """Every key a transformers NanoChat config.json may hold (NanoChat's fields and the generic ones)."""
    from transformers import NanoChatConfig
    return set(NanoChatConfig().to_dict()) | {"architectures", "transformers_version", "dtype", "torch_dtype",
                                                "_name_or_path", "rope_theta", "rope_scaling", "head_dim"}


def _size(cfg, key, path, limit=2**24):
    """cfg[key] as a positive integer no larger than limit, or ConversionError naming it."""
    v = cfg.get(key)
    if type(v) is not int or not 0 < v <= limit:
        raise ConversionError(f"{path}: {key} is {v!r}: a NanoChat config.json needs it as a whole number from 1 to "
                              f"{limit}")
    return v


def gpt_config_from_native(cfg, path):
    """A transformers NanoChat config.json (parsed) -> (GPTConfig, tied): checks every setting that changes
    the computation and refuses, naming it, what our GPT cannot do."""
    def refuse(what, why=""):
        return ConversionError(f"{path}: {what}{': ' + why if why else ''}")

    unknown = sorted(k for k, v in cfg.items() if k not in _known_nanochat_keys() and v not in (None, False, 0, [], {}))
    if unknown:
        raise refuse(f"has settings transformers' NanoChat does not define ({', '.join(unknown[:6])})",
                     "this is a modified NanoChat that nanochat's GPT cannot reproduce")
    hidden, layers, heads, vocab = (_size(cfg, k, path) for k in ("hidden_size", "num_hidden_layers",
                                                                   "num_attention_heads", "vocab_size"))
    kv = _size(cfg, "num_key_value_heads", path) if cfg.get("num_key_value_heads") is not None else heads
    seq = _size(cfg, "max_position_embeddings", path, MAX_CONTEXT) if cfg.get("max_position_embeddings") else 2048
    if hidden % heads or heads % kv or (hidden // heads) % 2:
        raise refuse(f"hidden_size {hidden}, {heads} heads and {kv} key/value heads do not divide evenly "
                     "into even-sized heads")
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise refuse(f"head_dim {cfg['head_dim']} is not hidden_size / num_attention_heads = {hidden // heads}",
                     "nanochat's GPT derives the head size from the width")
    checks = [
        ("hidden_act", cfg.get("hidden_act", "relu2"), "relu2", "nanochat's MLP is ReLU^2"),
        ("intermediate_size", cfg.get("intermediate_size"), 4 * hidden, "nanochat's MLP is 4x the width"),
        ("attention_bias", bool(cfg.get("attention_bias", False)), False, "nanochat's Linears have no bias"),
    ]
    for key, have, want, why in checks:
        if have != want:
            raise refuse(f"{key} is {have!r}, not {want!r}", why)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", ROPE_THETA)))
    if rope.get("rope_type", rope.get("type", "default")) != "default" or theta != ROPE_THETA:
        raise refuse(f"uses rotary {rope.get('rope_type', rope.get('type', 'default'))!r} with theta {theta}",
                     f"nanochat's GPT has plain RoPE with theta {ROPE_THETA:g}")
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    if eps > MAX_IMPORT_EPS:
        raise refuse(f"rms_norm_eps is {eps:g}", f"nanochat's RMSNorm uses the float epsilon ({NORM_EPS:.3g}); above "
                     f"{MAX_IMPORT_EPS:g} the difference changes the outputs")
    cap = cfg.get("final_logit_softcapping")
    if cap is not None and not (type(cap) in (int, float) and 0 < cap < 1e6):
        raise refuse(f"final_logit_softcapping is {cap!r}", "it must be a positive number or null")
    config = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=layers, n_head=heads, n_kv_head=kv,
                       n_embd=hidden, softcap=float(cap) if cap else 0.0)
    return config, bool(cfg.get("tie_word_embeddings", False))


def gpt_config_from_remote(cfg, path):
    """The config.json of an export in our own layout (model_type "nanochat_gpt": GPTConfig's fields at the
    top level, named by its "nanochat_fields") -> GPTConfig."""
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    fields = cfg.get("nanochat_fields")
    if not isinstance(fields, list) or not all(isinstance(k, str) and k in cfg for k in fields):
        raise ConversionError(f"{path}: model_type nanochat_gpt without its nanochat_fields: the folder is damaged; "
                              "export it again")
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ConversionError(f"{path}: the model uses {unknown}, which this nanochat's GPT does not have: "
                              "update nanochat (git pull) to import it")
    values = {k: cfg[k] for k in fields}
    for f in dataclasses.fields(GPTConfig):
        if f.name in values and f.type in (int, "int"):
            _size(values, f.name, path, MAX_CONTEXT if f.name == "sequence_len" else 2**24)
    if type(values.get("softcap", 0.0)) not in (int, float) or not 0 <= values.get("softcap", 0.0) < 1e6:
        raise ConversionError(f"{path}: softcap is {values['softcap']!r}: it must be a number >= 0")
    return GPTConfig(**values)
