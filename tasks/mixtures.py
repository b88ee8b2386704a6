"""Chat training mixtures for mid_train, chat_sft and chat_rl: a spec like "chitchat,mc,gsm8k*2,custom:me.jsonl"
becomes Task objects, split once into train and validation. `name@N` sets a task's size: N generated
problems for the generated tasks, the first N conversations for the others."""
from nanochat.common import print0
from tasks.arc import ARC
from tasks.common import TaskMixture
from tasks.conversations import ChatterBot, ChitChat
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, GSM8KSynthetic
from tasks.mc_train import mc_train_tasks
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tasks.tools import CopyDrill, ToolUse

# per-stage sizes of the generated tasks and the seeds that make SFT see different examples than mid
_STAGE_SIZES = {
    "mid": {"gsm8k": 10000, "spellingbee": 10000, "simplespelling": 5000, "tools": 6000, "copy": 3000, "seed": 0},
    "sft": {"gsm8k": 4000, "spellingbee": 1500, "simplespelling": 1000, "tools": 1500, "copy": 1000, "seed": 1},
}
# tasks read from data: stop -> the first `stop` conversations (name@N and --max-per-task, the smaller)
_READ = {
    "chitchat": lambda stop: [ChitChat("train", stop=stop)],
    "chatterbot": lambda stop: [ChatterBot("train", stop=stop)],
    "arc": lambda stop: [ARC(subset, "train", stop=stop) for subset in ("ARC-Easy", "ARC-Challenge")],
    "smoltalk": lambda stop: [SmolTalk("train", stop=stop)],
    "mmlu-aux": lambda stop: [MMLU("all", "auxiliary_train", stop=stop)],
    "gsm8k-train": lambda stop: [GSM8K("train", stop=stop)],
}
# generated tasks: name@N problems (default: the stage's size) from the stage's seed, capped at --max-per-task.
# "tools" is one task for the three tools, so the cap holds for all of them together: one task per tool (3x the
# tool conversations under the cpu profile's --max-per-task) measured no tool gain and a lower ChatCORE
# (dev/notes_tools.md)
_GENERATED = {
    "gsm8k": GSM8KSynthetic,
    "spellingbee": lambda **kw: SpellingBee(split="train", **kw),
    "simplespelling": lambda **kw: SimpleSpelling(split="train", **kw),
    "tools": ToolUse,
    "copy": CopyDrill,
}
TASK_NAMES = ("chitchat", "chatterbot", "mc", "arc", "gsm8k", "spellingbee", "simplespelling", "tools", "copy", "smoltalk",
              "mmlu-aux", "gsm8k-train")

# With online data (--online): the recipe of nanochat's Dec-2025 speedrun at its sizes. Midtraining:
# all of SmolTalk, MMLU auxiliary_train, the GSM8K train split (calculator annotations become tool
# calls), 200K spelling and 80K letter-counting problems. SFT: ARC-Easy + ARC-Challenge train, GSM8K
# train, 10K SmolTalk conversations, 300 + 300 spelling problems. The identity conversations
# (--identity-file) join both, twice in midtraining. Both add our generated tool-use conversations.
ONLINE_MIXTURES = {
    "mid": "smoltalk,mmlu-aux,gsm8k-train,simplespelling@200000,spellingbee@80000,tools@20000",
    "sft": "arc,gsm8k-train,smoltalk@10000,simplespelling@300,spellingbee@300,tools@1500",
}


def _split_size(name):
    """'spellingbee@300' -> ('spellingbee', 300); custom paths are left alone."""
    head, sep, tail = name.rpartition("@")
    if sep and tail.isdigit() and not name.startswith("custom:"):
        return head, int(tail)
    return name, None


def parse_mixture(spec):
    """'a,b*2,custom:/x.jsonl' -> [('a', 1), ('b', 2), ('custom:/x.jsonl', 1)]; unknown names fail here."""
    entries = []
    for raw in spec.split(","):
        raw = raw.strip()
        if not raw:
            continue
        name, repeat = raw, 1
        head, sep, tail = raw.rpartition("*")
        if sep and tail.isdigit():
            name, repeat = head, int(tail)
        if repeat < 1:
            raise ValueError(f"mixture entry {raw!r}: repeat must be >= 1")
        if not name.startswith("custom:") and _split_size(name)[0] not in TASK_NAMES:
            raise ValueError(f"unknown mixture entry {name!r}; expected one of {TASK_NAMES} or custom:PATH")
        if name.startswith("custom:") and not name[len("custom:"):]:
            raise ValueError(f"mixture entry {raw!r}: custom: needs a file path")
        entries.append((name, repeat))
    if not entries:
        raise ValueError(f"empty mixture {spec!r}")
    return entries


def build_tasks(spec, stage, max_per_task=-1, mc_per_task=-1):
    """The list of Task objects of a mixture spec (repeats listed repeatedly). max_per_task > 0 caps
    every task to its first max_per_task examples; mc_per_task > 0 caps each multiple-choice split."""
    sizes = _STAGE_SIZES[stage]
    cap = max_per_task if max_per_task and max_per_task > 0 else None

    def one(entry):
        name, size = _split_size(entry)
        stop = min(c for c in (cap, size) if c) if cap or size else None
        if name.startswith("custom:"):
            return [CustomJSON(name[len("custom:"):], stop=stop)]
        if name == "mc":
            caps = [c for c in (cap, mc_per_task if mc_per_task and mc_per_task > 0 else None) if c]
            return mc_train_tasks(max_per_task=min(caps) if caps else None)
        if name in _READ:
            return _READ[name](stop)
        return [_GENERATED[name](size=size or sizes[name], seed=sizes["seed"], stop=cap)]

    return [task for entry, repeat in parse_mixture(spec) for task in one(entry) * repeat]


def mixture_spec(args, default, stage):
    """The mixture a stage ("mid" or "sft") trains on: --mixture when given, else the online recipe
    with --online, else the offline default (and the log says what stands in for what)."""
    online = getattr(args, "online", False)
    if args.mixture:
        spec = args.mixture
    elif online:
        spec = ONLINE_MIXTURES[stage]
    else:
        spec = default
        print0(f"offline data: the {stage} mixture is {default}, standing in for the online recipe "
               f"{ONLINE_MIXTURES[stage]} (SmolTalk, MMLU auxiliary_train, GSM8K train); --online uses it")
    if args.identity_file:
        spec += f",custom:{args.identity_file}" + ("*2" if online and stage == "mid" and not args.mixture else "")
    elif online:
        print0("no --identity-file: the online recipe runs without identity conversations")
    return spec


def rl_train_task(online, size, seed):
    """RL problems: the GSM8K train split online, else template-generated GSM8K-style problems."""
    if online:
        return GSM8K(split="train")
    print0(f"offline data: RL trains on {size:,} GSM8KSynthetic problems, standing in for the GSM8K train "
           f"split; --online uses it")
    return GSM8KSynthetic(size=size, seed=seed)


def split_mixture(tasks, val_examples, seed=42):
    """(train, val): one seeded shuffle of all examples; the first val_examples (at most a tenth of
    the mixture, at least one) are held out for validation, the rest are for training."""
    n = len(TaskMixture(tasks, seed=seed))
    if n < 2:
        raise ValueError(f"the mixture has {n} conversation(s); need at least 2 (train + val)")
    n_val = max(1, min(val_examples, n // 10))
    return TaskMixture(tasks, seed=seed, start=n_val), TaskMixture(tasks, seed=seed, stop=n_val)


def describe_tasks(tasks):
    counts = {}
    for t in tasks:
        name = type(t).__name__ + (f"({t.name})" if hasattr(t, "name") else "")
        counts[name] = counts.get(name, 0) + len(t)
    return counts
