"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT/midtraining.

Online only: no package registry carries it. Offline, use tasks.conversations (ChitChat,
ChatterBot) and tasks.customjson instead; the error says so.
"""
from tasks import fetch
from tasks.common import Task, check_split

REPO = "HuggingFaceTB/smol-smoltalk"
SPLITS = ("train", "test")


def clean_messages(messages):
    """Messages with string content, an optional leading system message, then user/assistant
    alternating and ending with the assistant; None if the conversation cannot be used."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages
            if isinstance(m.get("content"), str) and m["content"].strip()]
    start = 1 if msgs and msgs[0]["role"] == "system" else 0
    for k, m in enumerate(msgs[start:]):
        if m["role"] != ("user" if k % 2 == 0 else "assistant"):
            return None
    if len(msgs) - start >= 2 and msgs[-1]["role"] == "user":
        msgs = msgs[:-1]
    if len(msgs) - start < 2:
        return None
    return msgs


class SmolTalk(Task):

    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        self.split = check_split(split, SPLITS, "SmolTalk split")
        table = fetch.load_with_fallback(
            f"SmolTalk ({split})", [], (REPO, lambda: fetch.hub_parquet(REPO, f"data/{split}-*.parquet")),
            hint="Offline, use tasks.conversations.ChitChat / ChatterBot or tasks.customjson.CustomJSON instead.")
        self.rows = table.column("messages")  # kept as Arrow; rows are converted on access

    eval_type = "generative"

    def get_example(self, index):
        msgs = clean_messages(self.rows[index].as_py())
        if msgs is None:  # rare malformed row: fall back to a neighbour so indexing stays total
            for j in range(1, 100):
                msgs = clean_messages(self.rows[(index + j) % len(self.rows)].as_py())
                if msgs is not None:
                    break
        return {"messages": msgs}
