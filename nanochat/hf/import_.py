"""Importing a Hugging Face NanoChat (a hub id or a local folder in transformers' layout, or one of our own
exports) as a checkpoint of ours under $NANOCHAT_BASE_DIR, tokenizer included, so every stage takes it;
the name and config mapping is convert.py's, the tokenizer's tokenizer_json.py's.

    import_model("karpathy/nanochat-d32")            # -> chatsft_checkpoints/d32/ + tokenizer/
    import_model("/path/to/folder", as_="base", tag="hf")

Everything is read and checked before anything is written: the config (architecture, every setting that
changes the computation), the tokenizer (byte-level BPE with our special tokens), the vocab sizes, every
weight's name and shape, the safetensors files (a truncated one is caught). Only weights in safetensors are
read: a pytorch_model.bin is a pickle, which can run code, and an imported folder is untrusted. Likewise a
folder's modeling code is never run. Then the checkpoint and the tokenizer are written into temp
directories and renamed into place, so a failure leaves the base dir as it was.
"""
import dataclasses
import datetime
import json
import os
import re
import shutil
import tempfile

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import load_file

from nanochat.checkpoint_manager import SOURCES, save_checkpoint, start_fresh
from nanochat.common import get_base_dir
from nanochat.gpt import GPT
from nanochat.hf.convert import (
    ConversionError,
    expected_names,
    from_native_state,
    gpt_config_from_native,
    gpt_config_from_remote,
    hf_block_name,
)
from nanochat.hf.export import usual_permissions
from nanochat.hf.tokenizer_json import (
    TokenizerConversionError,
    check_same_tokenizer,
    from_tokenizer_json,
)
from nanochat.tokenizer import Tokenizer, _load_cached

HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"]


def resolve_source(src, revision=None):
    """A local folder as it is, or a hub id (owner/name) downloaded to the hub cache -> (folder, revision)."""
    if os.path.isdir(src):
        return src, None
    if os.path.exists(src):
        raise ConversionError(f"{src} is a file: give the folder that holds config.json (or a hub id owner/name)")
    try:
        validate_repo_id(src)
    except HFValidationError:
        raise ConversionError(f"{src}: no such folder, and not a hub id (owner/name)") from None
    if src.count("/") != 1:
        raise ConversionError(f"{src}: no such folder; a hub id is owner/name")
    try:
        folder = snapshot_download(repo_id=src, revision=revision, allow_patterns=HUB_FILES)
    except Exception as e:  # noqa: BLE001 - network, auth, offline mode, missing repo: the same advice for each
        raise ConversionError(
            f"could not download {src} from the Hugging Face hub ({type(e).__name__}: {str(e).strip()[:300]}): "
            "check the id, the network and your token (HF_TOKEN, for private or gated models), or download the "
            "folder another way and pass its path") from None
    return folder, os.path.basename(folder.rstrip("/"))


def read_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{folder} has no config.json: it is not a transformers model folder (a raw "
                              "nanochat checkpoint goes into $NANOCHAT_BASE_DIR as it is)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}): download the folder again") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} is not a JSON object: download the folder again")
    return cfg, path


def gpt_config(cfg, path):
    """-> (GPTConfig, layout, tied) for a config.json: transformers' NanoChat or our own export's layout."""
    kind = cfg.get("model_type")
    try:
        if kind == "nanochat":
            config, tied = gpt_config_from_native(cfg, path)
            return config, "native", tied
        if kind == "nanochat_gpt":
            return gpt_config_from_remote(cfg, path), "remote", False
    except ConversionError:
        raise
    except (TypeError, ValueError, AttributeError) as e:  # a setting of the wrong type (a string for a number...)
        raise ConversionError(f"{path}: a setting has the wrong type ({type(e).__name__}: {e}): download the "
                              "folder again") from None
    archs = cfg.get("architectures") or []
    raise ConversionError(
        f"{path}: model_type {kind!r} ({', '.join(map(str, archs)) or 'no architectures'}) is not NanoChat: nanochat "
        "can import only transformers' NanoChat (model_type \"nanochat\", NanoChatForCausalLM) or its own exports, "
        "whose weights map one to one onto its GPT")


def safetensors_files(folder):
    """The weight files: model.safetensors, or the shards a model.safetensors.index.json names."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{index} is unreadable ({e}): download the folder again") from None
        bad = [f for f in files if os.path.basename(f) != f]
        if bad:
            raise ConversionError(f"{index} names files outside the folder ({bad[0]!r}): refusing it")
        return [os.path.join(folder, f) for f in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    if any(os.path.exists(os.path.join(folder, n)) for n in ("pytorch_model.bin", "model.pt")):
        raise ConversionError(f"{folder} has its weights only as a pickle (pytorch_model.bin), which can run code "
                              "when read: nanochat reads safetensors only. Convert it where you trust it: "
                              "model.save_pretrained(folder, safe_serialization=True)")
    raise ConversionError(f"{folder} has no model.safetensors (nor model.safetensors.index.json): download the "
                          "folder again, with its weights")


def read_weights(folder):
    """{name: tensor} from every safetensors file; a truncated or garbled file is refused by name."""
    tensors = {}
    for path in safetensors_files(folder):
        if not os.path.exists(path):
            raise ConversionError(f"{path} is missing (named by model.safetensors.index.json): download it again")
        try:
            tensors.update(load_file(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type, or OSError
            raise ConversionError(f"{path} is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}): "
                                  "download it again") from None
    return tensors


def our_state(tensors, config, layout, tied, path):
    """The file's tensors -> our state_dict, every name and shape checked against our GPT."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    name = (lambda ours: ours) if layout == "remote" else hf_block_name
    tensors = dict(tensors)
    if tied and name("transformer.wte.weight") in tensors:  # as transformers does: the head is the embedding
        tensors[name("lm_head.weight")] = tensors[name("transformer.wte.weight")].clone()
    # our own layout carries every weight our GPT has (a recipe piece's too); NanoChat's only the plain ones
    wanted = {name(k): k for k in (shapes if layout == "remote" else expected_names(config))}
    missing = [k for k in wanted if k not in tensors]
    extra = sorted(set(tensors) - set(wanted))
    if missing or extra:
        what = f"lacks {missing[:3]}" if missing else f"has weights nanochat's GPT has no place for: {extra[:3]}"
        raise ConversionError(f"{path}: the weights do not match the config ({what}); this is not a plain NanoChat "
                              "of that size: download the folder again, or check config.json")
    for theirs, ours in wanted.items():
        if tuple(tensors[theirs].shape) != shapes[ours]:
            raise ConversionError(f"{path}: {theirs} has shape {tuple(tensors[theirs].shape)} but config.json says "
                                  f"{shapes[ours]}: the config and the weights belong to different models")
    tensors = {k: v if v.dtype in (torch.float32, torch.bfloat16) else v.float() for k, v in tensors.items()}
    return {k: tensors[k] for k in wanted} if layout == "remote" else from_native_state(tensors, config)


def read_folder(folder):
    """Everything an import needs, checked, nothing written: -> (GPTConfig, state_dict, Tokenizer, notes)."""
    cfg, cfg_path = read_config(folder)
    config, layout, tied = gpt_config(cfg, cfg_path)
    tok_path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise ConversionError(f"{folder} has no tokenizer.json: the model is useless without the tokenizer it was "
                              "trained with; download the folder again, with its tokenizer")
    try:
        tokenizer = from_tokenizer_json(tok_path)
    except TokenizerConversionError as e:
        raise ConversionError(str(e)) from None
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ConversionError(f"{cfg_path}: vocab_size is {config.vocab_size} but {tok_path} has "
                              f"{tokenizer.get_vocab_size()} tokens: the model and the tokenizer do not belong "
                              "together; download the folder again (a padded vocabulary cannot be imported)")
    state = our_state(read_weights(folder), config, layout, tied, os.path.join(folder, "model.safetensors"))
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)  # the last check: it really is our GPT
    notes = {"layout": layout, "model_type": cfg.get("model_type"),
             "transformers_version": cfg.get("transformers_version"),
             "rms_norm_eps": cfg.get("rms_norm_eps"), "tied_embeddings": tied}
    return config, state, tokenizer, notes


def plan_writes(base, as_, tag, tokenizer, force):
    """Where the import goes and what it replaces; refuses to replace anything without force.
    -> (checkpoint dir, whether the tokenizer must be written)."""
    final = os.path.join(base, SOURCES[as_][0], tag)
    if os.path.exists(final) and os.listdir(final) and not force:
        raise ConversionError(f"{final} already holds checkpoints: import under another tag (-g), or pass --force "
                              f"to move them to {os.path.basename(final)}.prev")
    tok_dir = os.path.join(base, "tokenizer")
    try:
        current = Tokenizer.from_directory(tok_dir)
    except FileNotFoundError:
        return final, True
    if check_same_tokenizer(current, tokenizer):
        return final, False
    if not force:
        raise ConversionError(f"{tok_dir} holds a different tokenizer, which this base dir's other checkpoints were "
                              "trained with: import into a fresh base dir (NANOCHAT_BASE_DIR=...), or pass --force to "
                              "move it to tokenizer.prev (those checkpoints then stop loading)")
    return final, True


def import_model(src, as_="sft", tag=None, force=False, revision=None):
    """Import (see the module docstring). -> a summary dict (where it went, the config, notes)."""
    if as_ not in SOURCES:
        raise ConversionError(f"--as must be one of {', '.join(SOURCES)}; got {as_!r}")
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", tag):
        raise ConversionError(f"tag {tag!r}: use 1-64 letters, digits, '.', '_' or '-' (it names a directory)")
    folder, rev = resolve_source(src, revision)
    config, state, tokenizer, notes = read_folder(folder)
    tag = tag or f"d{config.n_layer}"
    base = get_base_dir()
    final, write_tokenizer = plan_writes(base, as_, tag, tokenizer, force)
    meta = {"step": 0, "model_config": dataclasses.asdict(config),
            "imported_from": {"source": src, "folder": os.path.abspath(folder), "revision": rev,
                              "date": datetime.datetime.now().isoformat(timespec="seconds"), **notes}}
    _write(base, final, state, meta, tokenizer if write_tokenizer else None)
    return {"checkpoint": final, "tag": tag, "as": as_, "step": 0, "tokenizer_written": write_tokenizer,
            "config": dataclasses.asdict(config), **notes}


def _write(base, final, state, meta, tokenizer):
    """Stage the checkpoint (and tokenizer) in temp directories, then rename them into place; a failure
    part way puts back what was moved."""
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    staged, undo = [], []
    try:
        tmp_ckpt = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}.", suffix=".tmp")
        staged.append(tmp_ckpt)
        save_checkpoint(tmp_ckpt, 0, state, None, meta)
        usual_permissions(tmp_ckpt)
        if tokenizer is not None:
            tok_dir = os.path.join(base, "tokenizer")
            tmp_tok = tempfile.mkdtemp(dir=base, prefix=".tokenizer.", suffix=".tmp")
            staged.append(tmp_tok)
            tokenizer.save(tmp_tok)
            usual_permissions(tmp_tok)
            if os.path.lexists(tok_dir):  # (force) one generation kept, as for checkpoints
                prev = tok_dir + ".prev"
                if os.path.isdir(prev) and not os.path.islink(prev):
                    shutil.rmtree(prev)
                elif os.path.lexists(prev):
                    os.remove(prev)
                os.replace(tok_dir, prev)
                undo.append(lambda: os.replace(prev, tok_dir))
            os.replace(tmp_tok, tok_dir)
            undo.append(lambda: os.replace(tok_dir, tmp_tok))
            _load_cached.cache_clear()  # this process may have read the old one
        if os.path.exists(final):
            start_fresh(final)  # (force) the old checkpoints go to <tag>.prev
        os.replace(tmp_ckpt, final)
    except BaseException:
        for step in reversed(undo):
            step()
        for d in staged:
            shutil.rmtree(d, ignore_errors=True)
        raise
