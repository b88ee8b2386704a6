"""The --depth dial's training settings: from the model a depth builds, the training horizon, the batch size, the
learning-rate scale and the weight-decay scale, each rule beside its source. The model's shape comes from the
caller (scripts/base_train.py's model_config); this module derives numbers and touches no data or device.

The rules are upstream nanochat's (its dev/LOG.md and scripts/base_train.py, 2026): tune at d12, then transfer.
- horizon: D = ratio * N training tokens, N the model's parameters less any value-embedding tables (ratio 20 is
  Chinchilla's, our default, set with the token embedding counted; upstream fits 10.5 over matrices + lm_head
  only, a horizon not raced here yet)
- batch: B = B_ref * (D / D_ref)^0.383, rounded to a power of two, B_ref = 2^19 tokens at d12 (Power Lines,
  arXiv:2505.13738: the best batch grows with the training tokens, not the parameters)
- learning rates: eta = eta_ref * sqrt(B / B_ref) (the square-root rule for Adam; upstream assumes it for Muon too)
- weight decay: lambda = lambda_ref * sqrt(B / B_ref) * D_ref / D, which keeps T_epoch = B / (eta * lambda * D)
  constant (arXiv:2405.13698) once eta follows the rule above
The batch is derived only when --total-batch-size is not given; the LR and weight-decay rules apply only to a
derived batch, so a run that names its batch (every speedrun profile does) trains exactly as its flags say.
"""
import math
from dataclasses import asdict, dataclass

import torch

from nanochat.gpt import GPT

REF_DEPTH = 12  # where upstream tuned batch, LRs and weight decay; our LR defaults come from that same recipe
REF_BATCH = 2**19  # upstream's best batch at d12, in tokens
BATCH_EXPONENT = 0.383  # Power Lines: B_opt grows as D^0.383
DEFAULT_RATIO = 20  # training tokens per parameter when the run's own ratio is not set (Chinchilla)


@dataclass
class Dial:
    depth: int
    n_embd: int
    n_head: int
    params: int  # N: the parameters of the model the depth builds, less value-embedding tables (count_params)
    ratio: float  # tokens per parameter of the horizon the batch rule reads
    tokens: int  # D = ratio * N
    ref_tokens: int  # D_ref: the same ratio at d12, same vocabulary and options
    batch: int  # tokens per optimizer step
    batch_derived: bool  # False: --total-batch-size was given and nothing below is scaled
    lr_scale: float  # times every default learning rate (an LR given on the command line is kept as given)
    weight_decay_scale: float  # times the weight decays (AdamW's --weight-decay, Muon's muon_weight_decay)

    def lines(self):
        """What the run prints at start: each number and the rule that gave it."""
        how = (f"B_ref * (D/D_ref)^{BATCH_EXPONENT} = {REF_BATCH:,} * ({self.tokens:,}/{self.ref_tokens:,})"
               f"^{BATCH_EXPONENT}, to a power of two" if self.batch_derived else "given (--total-batch-size)")
        return [f"dial: depth {self.depth} -> width {self.n_embd}, {self.n_head} heads, {self.params:,} parameters",
                f"dial: horizon D = {self.ratio:g} tokens/param * N = {self.tokens:,} tokens (d{REF_DEPTH}: "
                f"{self.ref_tokens:,})",
                f"dial: batch {self.batch:,} tokens/step: {how}",
                f"dial: LRs x {self.lr_scale:.4f} (sqrt(B/B_ref)), weight decay x {self.weight_decay_scale:.4f} "
                "(sqrt(B/B_ref) * D_ref/D)" + ("" if self.batch_derived else ": not scaled, the batch was given")]

    def as_dict(self):
        return asdict(self)


def count_params(config):
    """N of the horizon: the parameters of the GPT a config builds (on the meta device: no memory, no init), less
    its value-embedding tables. Those are capacity read by lookup, not compute, and at vocab 65,536 d20's come to
    839M, more than the rest of the model: counted, they would more than double the training tokens of a model
    whose step costs about the same. So turning them on keeps the horizon of the plain model."""
    with torch.device("meta"):
        model = GPT(config)
    tables = model.value_embeds.parameters() if config.value_embeds else ()
    return model.num_params() - sum(p.numel() for p in tables)


def derive(depth, make_config, ratio=DEFAULT_RATIO, batch=-1):
    """The Dial of a depth. make_config(depth) -> GPTConfig (the caller's shape rule and model options, so the d12
    reference has the same vocabulary and pieces); ratio: tokens per parameter (<= 0: DEFAULT_RATIO); batch:
    tokens per step, <= 0 to derive it."""
    config = make_config(depth)
    ratio = ratio if ratio > 0 else DEFAULT_RATIO
    n = count_params(config)
    tokens, ref_tokens = int(ratio * n), int(ratio * count_params(make_config(REF_DEPTH)))
    derived = batch <= 0
    if derived:
        batch = 2 ** round(math.log2(REF_BATCH * (tokens / ref_tokens) ** BATCH_EXPONENT))
    lr_scale = math.sqrt(batch / REF_BATCH) if derived else 1.0
    wd_scale = math.sqrt(batch / REF_BATCH) * ref_tokens / tokens if derived else 1.0
    return Dial(depth, config.n_embd, config.n_head, n, ratio, tokens, ref_tokens, batch, derived, lr_scale, wd_scale)


LR_FLAGS = ("embedding_lr", "unembedding_lr", "matrix_lr")


def apply_dial(dial, args, lr_defaults):
    """Set args.total_batch_size, every LR flag left unset (None) to its default times the dial's scale, and
    args.weight_decay times the weight-decay scale. lr_defaults: {flag: the LR at B_ref}."""
    args.total_batch_size = dial.batch
    for name in LR_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, lr_defaults[name] * dial.lr_scale)
    args.weight_decay *= dial.weight_decay_scale
