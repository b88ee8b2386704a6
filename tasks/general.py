"""General prompts and chats for live learning: the battery (fixed prompts from held-out chat eval tasks that
measure whether an adapter left the rest of the model alone) and the replay (train-split chats of the SFT
mixture mixed into an adapter's training); what is done with them is nanochat/serve/battery.py's and live.py's.

Battery (48 prompts, same every run): 8 calculator problems, 6 python and 6 search problems (tasks/tools.py
ToolsEval: held out by hash / by entity), 4 letter counts and 4 spellings of test-split words
(tasks/spellingbee.py), 4 ARC-Easy and 4 MMLU test questions, 6 short factual questions and 6 chit-chat
openings (ChatterBot and ChitChat test splits). Each source is picked at evenly spaced indices; a source
whose data cannot be read is left out with a warning, so the battery is smaller, never different.
"""
import logging
import re

from nanochat.serve.battery import BatteryItem

logger = logging.getLogger("tasks.general")
SFT_MIXTURE = "arc,gsm8k,spellingbee,simplespelling,tools,chitchat,chatterbot"  # scripts/chat_sft.py's default
_FACTUAL = re.compile(r"(what|who|when|where|which|how many|how much)\b", re.IGNORECASE)


def _spaced(n_total, n):
    """n evenly spaced indices into n_total items (all of them when there are fewer)."""
    return [i * n_total // n for i in range(n)] if n_total > n else list(range(n_total))


def _item(source, i, kind, conv, max_tokens, evaluate=None):
    messages = [m for m in conv["messages"] if m["role"] != "assistant"][:1]  # the opening user turn
    check = None if evaluate is None else (lambda reply, conv=conv: bool(evaluate(conv, reply)))
    return BatteryItem(f"{source}/{i}", kind, messages, max_tokens, check)


def _tools():
    from tasks.tools import ToolsEval
    out = []
    for group, kind, n, max_tokens in (("math", "calculator", 8, 48), ("python", "python", 6, 96),
                                       ("facts", "search", 6, 160)):
        task = ToolsEval(group=group)
        out += [_item(f"tools-{group}", i, kind, task[i], max_tokens, task.evaluate) for i in range(n)]
    return out


def _spelling():
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    bee, simple = SpellingBee(size=1000, split="test"), SimpleSpelling(size=1000, split="test")
    return ([_item("spellingbee", i, "spelling", bee[i], 128, bee.evaluate) for i in _spaced(len(bee), 4)]
            + [_item("simplespelling", i, "spelling", simple[i], 32, simple.evaluate) for i in _spaced(len(simple), 4)])


def _multiple_choice():
    from tasks.arc import ARC
    from tasks.mmlu import MMLU
    out = []
    for name, task in (("arc-easy", ARC("ARC-Easy", "test")), ("mmlu", MMLU("all", "test"))):
        out += [_item(name, i, "mc", task[i], 8, task.evaluate) for i in _spaced(len(task), 4)]
    return out


def _factual():
    from tasks.conversations import ChatterBot
    task = ChatterBot("test")
    picks = [i for i in range(len(task)) if _FACTUAL.match(task[i]["messages"][0]["content"])]
    return [_item("chatterbot", i, "factual", task[i], 48) for i in (picks[j] for j in _spaced(len(picks), 6))]


def _chat():
    from tasks.conversations import ChitChat
    task = ChitChat("test")
    return [_item("chitchat", i, "chat", task[i], 48) for i in _spaced(len(task), 6)]


SOURCES = {"tools": _tools, "spelling": _spelling, "multiple choice": _multiple_choice, "factual": _factual,
           "chat": _chat}


def battery_items():
    """The battery's BatteryItems (module docstring); sources that cannot be read are left out, logged."""
    items = []
    for name, build in SOURCES.items():
        try:
            items += build()
        except (OSError, ValueError, RuntimeError, ImportError) as e:
            logger.warning("general battery: no %s prompts (%s)", name, e)
    return items


def replay_chats(n=512, max_per_task=400, spec=SFT_MIXTURE, seed=0):
    """n train-split conversations of the SFT mixture (each task capped at its first max_per_task, as the cpu
    speedrun trains), a fixed shuffled pick: what an adapter replays so that it keeps answering like the model
    it starts from. Its messages only. A task whose data cannot be read is left out, logged."""
    import random

    from tasks.common import TaskMixture
    from tasks.mixtures import build_tasks
    tasks = []
    for name in spec.split(","):
        try:
            tasks += build_tasks(name, "sft", max_per_task=max_per_task)
        except (OSError, ValueError, RuntimeError, ImportError) as e:
            logger.warning("replay: no %s chats (%s)", name, e)
    if not tasks:
        return []
    mixture = TaskMixture(tasks, seed=seed)
    order = list(range(len(mixture)))
    random.Random(seed).shuffle(order)
    return [mixture[i]["messages"] for i in order[:n]]
