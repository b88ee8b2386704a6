"""Exporting one of our checkpoints as a Hugging Face folder (model, tokenizer with chat template, generation
config, model card, optionally a PEFT adapter) and uploading it to the hub; what goes into each file is
convert.py's, tokenizer_json.py's, model_card.py's and peft.py's business.

    export(out_dir, source="sft")                      # -> out_dir/ with config.json, model.safetensors, ...
    export(out_dir, adapters=[("facts", 1.0)])         # + out_dir/adapters/facts/ in PEFT's layout
    export(out_dir, adapters=[("a", 1.0), ("b", 0.5)], merge=True)   # the stack merged into the weights
    push(out_dir, "me/my-nanochat")

The folder is written into a temp directory beside out_dir and renamed into place at the end, so a failed
export leaves nothing (and an existing folder is only replaced with force=True).
"""
import dataclasses
import os
import shutil
import tempfile

import torch
from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import save_file

from nanochat.checkpoint_manager import SOURCES, find_largest_model, load_model
from nanochat.common import get_base_dir
from nanochat.hf.convert import (
    ConversionError,
    choose_layout,
    native_config,
    to_native_state,
)
from nanochat.hf.model_card import model_card
from nanochat.hf.peft import save_peft_adapter
from nanochat.hf.tokenizer_json import save_pretrained_tokenizer
from nanochat.lora.adapter import AdapterBaseMismatch, LoRA
from nanochat.lora.storage import adapter_path, load_adapter

REMOTE_FILE = "modeling_nanochat_gpt.py"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def check_out_dir(out_dir, force):
    """Refuse to overwrite a non-empty folder unless force (an empty one is fine)."""
    if os.path.isfile(out_dir):
        raise ConversionError(f"{out_dir} is a file: give a folder to export into")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ConversionError(f"{out_dir} already exists and is not empty: choose a new folder, or pass --force to "
                              "replace it")


def load_checkpoint_for_export(source, tag, step):
    """-> (model, tokenizer, meta, tag) of a stage's checkpoint on the CPU, fp32."""
    if tag is None:
        try:
            tag = find_largest_model(os.path.join(get_base_dir(), SOURCES[source][0]))
        except FileNotFoundError:
            pass  # load_model says what to run
    model, tokenizer, meta = load_model(source, "cpu", "eval", model_tag=tag, step=step)
    return model, tokenizer, meta, tag


def attach_adapters(model, adapters):
    """Load the saved adapters [(name, weight)] onto the model (each checked against its base) -> LoRA."""
    lora = LoRA(model)
    for name, _ in adapters:
        try:
            load_adapter(lora, adapter_path(name))
        except FileNotFoundError:
            raise ConversionError(f"no adapter {name!r} at {adapter_path(name)}: list them with GET /adapters "
                                  "(chat_web) or look in $NANOCHAT_BASE_DIR/adapters") from None
        except AdapterBaseMismatch as e:
            raise ConversionError(f"{e} (choose the checkpoint with -i/-g/-s)") from None
    if len(adapters) == 1:  # alone, a nested adapter would be applied without the stack it was trained on
        under = (lora.adapters[adapters[0][0]].info.get("provenance") or {}).get("stacked_on") or []
        if under:
            names = " ".join(f"--adapter {u['name']}:{u.get('weight', 1.0):g}" for u in under)
            raise ConversionError(f"adapter {adapters[0][0]!r} was trained on top of {[u['name'] for u in under]} and "
                                  f"only works with them beneath it: export the stack merged ({names} --adapter "
                                  f"{adapters[0][0]} --merge)")
    return lora


def write_model_files(folder, model, tokenizer, layout, dtype):
    """config.json, model.safetensors, generation_config.json (+ the modeling file for the remote layout)."""
    from transformers import GenerationConfig
    config = model.config
    S = tokenizer.encode_special
    state = model.state_dict()
    if layout == "native":
        from transformers import NanoChatConfig
        hf_config = NanoChatConfig(**native_config(config, tokenizer))
        hf_config.architectures = ["NanoChatForCausalLM"]
        state = to_native_state(state, config)
    else:
        from nanochat.hf.modeling_nanochat_gpt import NanoChatGPTConfig  # imports transformers (the hf extra)
        fields = dataclasses.asdict(config)
        hf_config = NanoChatGPTConfig(
            **fields, bos_token_id=S("<|bos|>"), eos_token_id=S("<|assistant_end|>"),
            pad_token_id=S("<|assistant_end|>"), architectures=["NanoChatGPTForCausalLM"],
            auto_map={"AutoConfig": f"{REMOTE_FILE[:-3]}.NanoChatGPTConfig",
                      "AutoModelForCausalLM": f"{REMOTE_FILE[:-3]}.NanoChatGPTForCausalLM"},
            nanochat_fields=sorted(fields))
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), REMOTE_FILE),
                        os.path.join(folder, REMOTE_FILE))
    hf_config.dtype = str(dtype).removeprefix("torch.")
    hf_config.save_pretrained(folder)
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    # chat_cli's defaults; a reply ends at <|assistant_end|> (or a new document's <|bos|>)
    GenerationConfig(bos_token_id=S("<|bos|>"), eos_token_id=[S("<|assistant_end|>"), S("<|bos|>")],
                     pad_token_id=S("<|assistant_end|>"), do_sample=True, temperature=0.6, top_k=50,
                     max_new_tokens=512).save_pretrained(folder)


def export(out_dir, source="sft", tag=None, step=None, dtype="fp32", adapters=(), merge=False, remote_code=False,
           license="mit", repo_id=None, report_path=None, force=False):
    """Write the folder (see the module docstring). adapters: [(name, weight)]: one is exported in PEFT's
    layout beside the model, a stack needs merge=True (merged into the weights). -> a summary dict."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of bf16, fp32; got {dtype!r}")
    adapters = list(adapters)
    if len(adapters) > 1 and not merge:
        raise ConversionError("a stack of adapters exports as merged weights (a PEFT folder holds one adapter): "
                              "add --merge, or export the adapters one at a time")
    check_out_dir(out_dir, force)
    if report_path and not os.path.isfile(report_path):
        raise ConversionError(f"--report {report_path}: no such file")
    report_path = report_path or os.path.join(get_base_dir(), "report", "report.md")
    model, tokenizer, meta, tag = load_checkpoint_for_export(source, tag, step)
    lora = attach_adapters(model, adapters) if adapters else None
    layout = choose_layout(model.config, remote=remote_code)
    out_dir = os.path.abspath(out_dir)
    info = dict(repo_id=repo_id, license=license, layout=layout, dtype=dtype, source=source, tag=tag,
                step=meta.get("step"), adapter=None, stack=None)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp")
    try:
        if lora is not None and merge:
            lora.activate([n for n, _ in adapters], [w for _, w in adapters], merge=True)
            info["stack"] = adapters
        write_model_files(tmp, model, tokenizer, layout, DTYPES[dtype])
        if lora is not None and not merge:
            info["adapter"] = _write_adapter(tmp, lora, adapters[0][0], model.config, layout, repo_id or out_dir)
        save_pretrained_tokenizer(tokenizer, tmp, model.config.sequence_len)
        report = None
        if os.path.exists(report_path):
            with open(report_path, encoding="utf-8") as f:
                report = f.read()
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(model.config, info, report, get_base_dir()))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lora is not None:
            lora.close()
    return dict(info, out_dir=out_dir, files=sorted(_files(out_dir)), report=bool(report))


def _write_adapter(folder, lora, name, config, layout, base_model):
    ad = lora.adapters[name]
    path = f"adapters/{name}"
    os.makedirs(os.path.join(folder, path))
    save_peft_adapter(ad, config, layout, os.path.join(folder, path), base_model)
    return {"name": name, "path": path, "rank": ad.rank, "alpha": ad.alpha}


def _umask():
    try:  # read, not set-and-restore: another thread may be creating files meanwhile
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def usual_permissions(folder):
    """What the folder would have had if made with os.makedirs/open (mkdtemp makes it private to its owner)."""
    umask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def _replace_dir(tmp, out_dir):
    """Rename the finished temp folder to out_dir; an existing one is moved aside first and removed after."""
    usual_permissions(tmp)
    if os.path.exists(out_dir):
        old = tmp[:-len(".tmp")] + ".old"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _files(folder):
    for root, _, names in os.walk(folder):
        for n in names:
            yield os.path.relpath(os.path.join(root, n), folder)


def check_repo_id(repo_id):
    """A hub repo id (owner/name) or ConversionError, before anything is exported."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConversionError(f"--push {repo_id!r} is not a hub repo id ({e}): use owner/name") from None
    if repo_id.count("/") != 1:
        raise ConversionError(f"--push {repo_id!r}: give owner/name (your user or organisation, then the model's name)")


def push(out_dir, repo_id, private=False):
    """Upload the exported folder to the hub as repo_id (created if missing); the token comes from the usual
    places (HF_TOKEN, `hf auth login`). Any failure is a ConversionError saying what to do."""
    check_repo_id(repo_id)
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=out_dir, repo_id=repo_id, repo_type="model",
                                   commit_message="Upload a nanochat export")
    except Exception as e:  # noqa: BLE001 - network, auth, offline mode: the same advice for each
        raise ConversionError(
            f"could not upload {out_dir} to the Hugging Face hub as {repo_id} ({type(e).__name__}: "
            f"{str(e).strip()[:300]}). The exported folder is complete: check the network and your token "
            f"(HF_TOKEN or `hf auth login`), then upload it with `hf upload {repo_id} {out_dir}`") from None
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
