"""The --depth dial (nanochat/dial.py, scripts/base_train.py): the reference depth reproduces the reference
settings, the rules scale as their formulas say, and flags given explicitly (the speedrun profiles') are kept."""
import dataclasses
import math

import pytest

from nanochat.dial import REF_BATCH, apply_dial, derive
from scripts.base_train import depth_config, model_config, parse_args

V = 65536  # the GPU profiles' vocabulary


def make(**options):
    """make_config for derive: our width/heads rule at sequence 2048, with model options."""
    return lambda d: dataclasses.replace(model_config(d, 2048, V), **options)


def test_d12_is_the_reference():
    dial = derive(12, make())
    assert dial.batch == REF_BATCH and dial.tokens == dial.ref_tokens
    assert dial.lr_scale == pytest.approx(math.sqrt(1.0)) and dial.weight_decay_scale == pytest.approx(1.0)


def test_deeper_models_get_larger_batches_and_the_rules_numbers():
    d20 = derive(20, make())
    # N(d20) / N(d12) = 560.0M / 185.3M; B = 2^19 * 3.02^0.383 = 1.46 * 2^19 -> 2^19.55 -> 2^20
    assert d20.params == 20 * 12 * 1280**2 + 2 * V * 1280
    assert d20.batch == 2**20
    assert d20.lr_scale == pytest.approx(math.sqrt(2))
    assert d20.weight_decay_scale == pytest.approx(math.sqrt(2) * d20.ref_tokens / d20.tokens)
    d4 = derive(4, make())
    assert d4.batch < REF_BATCH and d4.lr_scale < 1 and d4.weight_decay_scale > d4.lr_scale
    batches = [derive(d, make()).batch for d in (4, 8, 12, 16, 20, 26)]
    assert batches == sorted(batches) and all(b & (b - 1) == 0 for b in batches)


def test_the_ratio_moves_the_horizon_and_value_embedding_tables_do_not():
    plain = derive(20, make())
    assert derive(20, make(), ratio=10).tokens == pytest.approx(plain.tokens / 2, abs=1)
    # the tables are 10 x V x 1280 = 839M lookups at d20: counted, they would more than double the horizon.
    # N keeps only the gates (12 channels -> one per kv head, 10 heads, on 10 of the 20 layers)
    ve = derive(20, make(value_embeds=True))
    assert ve.params - plain.params == 10 * 12 * 10
    assert ve.tokens == pytest.approx(plain.tokens, rel=1e-5) and ve.batch == plain.batch
    # a piece with matrices of its own still counts: the smear gate's and backout's weights are in N
    assert derive(20, make(smear=True)).params > plain.params


def test_a_given_batch_scales_nothing():
    dial = derive(20, make(), batch=8192)
    assert dial.batch == 8192 and not dial.batch_derived and dial.lr_scale == dial.weight_decay_scale == 1.0
    assert "not scaled, the batch was given" in dial.lines()[-1]


def test_base_train_flags_derive_or_keep():
    """No batch flag: the dial sets batch and the default LRs; the cpu profile's explicit flags stay as given."""
    args = parse_args(["--depth", "20", "--matrix-lr", "0.03"])
    dial = derive(20, lambda d: depth_config(args, V, d), args.target_param_data_ratio, args.total_batch_size)
    apply_dial(dial, args, args.lr_defaults)
    assert args.total_batch_size == 2**20
    assert args.matrix_lr == 0.03  # given: kept
    assert args.embedding_lr == pytest.approx(args.lr_defaults["embedding_lr"] * math.sqrt(2))
    cpu = parse_args("--depth=4 --max-seq-len=512 --device-batch-size=8 --total-batch-size=8192 "
                     "--num-iterations=200 --eval-every=50".split())
    dial = derive(4, lambda d: depth_config(cpu, 4096, d), cpu.target_param_data_ratio, cpu.total_batch_size)
    apply_dial(dial, cpu, cpu.lr_defaults)
    assert cpu.total_batch_size == 8192 and cpu.weight_decay == 0.0
    assert {k: getattr(cpu, k) for k in cpu.lr_defaults} == cpu.lr_defaults
