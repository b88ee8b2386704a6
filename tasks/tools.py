"""Generated conversations that teach the tools (ToolUse, for mid/SFT) and the held-out problems that measure
them (ToolsEval), all from verifiable templates; plus the fictional fact corpus the search tool indexes.

Call format (nanochat.tools.registry): a plain expression is the calculator, `python:\\n<code>` the REPL,
`search: <query>` the local index. Every reply ends with `#### <answer>`; ToolsEval scores that answer
exactly.

Kinds of problem:
- calculator: multi-digit arithmetic ("What is 4837 * 2917?").
- python: counting letters, reversing / sorting strings, list sums, ranges and means (some in two calls, so
  the REPL's kept state is part of what is taught), days between dates, weekdays.
- search: facts about invented islands, people and mountains. They exist only in `fact_documents()`,
  which `scripts.build_index --facts` adds to the index, so a model can know them only by searching.
  The query is the question as asked; the tool output in a training conversation is the entity's own
  document then another entity's, numbered and cut like the real tool's answer (nanochat.tools.search).
Every reply has one shape: a fixed line, the call, its output, then at once `#### <answer>` copied from
the output (the kept-state python form makes two calls before it).
CopyDrill (`copy` in a mixture) is the same call-then-quote shape about newly invented entities plus
verbatim echoes: answers that can only be copied, which the d4 model must learn before the tools help it.
Held out: a problem whose question hashes to 0 mod 10 (crc32) is a test problem and is never generated for
training; facts are held out by entity (test entities' documents are indexed, never trained on).
"""
import datetime
import functools
import random
import zlib

from nanochat.tools.search import format_passages
from tasks.common import Task

# ---------------------------------------------------------------------------------------------
# the invented facts

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "th",
           "tr", "v", "z", "zh", "h", "j", "sk", "w", "y"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "k", "m", "x", "nd", "rn"]
_BIRDS = ["heron", "kestrel", "puffin", "swallow", "magpie", "osprey", "crane", "wren", "falcon", "ibis",
          "pelican", "sparrow", "raven", "kingfisher", "egret"]
_SEAS = ["northern", "southern", "eastern", "western", "amber", "silver", "quiet", "windy"]
_JOBS = ["chemist", "engineer", "clockmaker", "astronomer", "botanist", "cartographer", "glassblower", "physician"]
_DEVICES = ["tide clock", "folding telescope", "steam loom", "brass compass", "water filter", "paper kite",
            "pocket barometer", "seed drill", "signal lamp", "rope bridge", "salt press", "wind gauge"]
N_ENTITIES = 1500


def _name(rng, syllables):
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


def _entity(rng, kind, name):
    """One invented entity of a kind ("island", "person", "mountain"): (doc, [(question, answer, quote)])."""
    if kind == "island":
        capital, year, bird = _name(rng, 2), rng.randint(1200, 1950), rng.choice(_BIRDS)
        sea = rng.choice(_SEAS)
        s1, s2 = f"Its capital is {capital}.", f"It was founded in {year}."
        s3 = f"Its national bird is the {bird}."
        doc = f"{name} is an island nation in the {sea} sea. {s1} {s2} {s3}"
        return doc, [(f"What is the capital of {name}?", capital, s1),
                     (f"In what year was {name} founded?", str(year), s2),
                     (f"What is the national bird of {name}?", bird, s3)]
    if kind == "person":
        first = _name(rng, 2)
        person = f"{first} {name}"
        job, year, town, device = rng.choice(_JOBS), rng.randint(1500, 1990), _name(rng, 2), rng.choice(_DEVICES)
        s1 = f"{person} was {'an' if job[0] in 'aeiou' else 'a'} {job} born in {year} in the town of {town}."
        s2 = f"{first} is best known for inventing the {device}."
        return f"{s1} {s2}", [(f"In what year was {person} born?", str(year), s1),
                              (f"In which town was {person} born?", town, s1),
                              (f"What did {person} invent?", device, s2)]
    height, year, climber = rng.randint(1200, 8800), rng.randint(1750, 2010), _name(rng, 2)
    s1, s2 = f"Mount {name} rises {height} metres above sea level.", f"It was first climbed in {year} by {climber}."
    return f"{s1} {s2}", [(f"How high is Mount {name}, in metres?", str(height), s1),
                          (f"In what year was Mount {name} first climbed?", str(year), s2),
                          (f"Who first climbed Mount {name}?", climber, s2)]


@functools.cache  # fixed, and built once: every problem and the index read it
def _entities():
    """The fixed list of invented entities: (kind, name, doc, [(question, answer, quote)])."""
    rng = random.Random(20241201)
    seen, out = set(), []
    while len(out) < N_ENTITIES:
        kind = ("island", "person", "mountain")[len(out) % 3]
        name = _name(rng, rng.choice((2, 3)))
        if name in seen:
            continue
        seen.add(name)
        doc, qa = _entity(rng, kind, name)
        out.append((kind, name, doc, qa))
    return out


def entities(split):
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return [e for e in _entities() if _held_out(e[1]) == (split == "test")]


def fact_documents():
    """(source, text) of every invented entity, train and test: what `build_index --facts` adds."""
    return [(f"facts:{name}", doc) for _, name, doc, _ in _entities()]


def _held_out(text):
    return zlib.crc32(text.encode()) % 10 == 0


# ---------------------------------------------------------------------------------------------
# problem generators: rng -> (kind, question, [assistant parts], answer)

def _letters(rng, lo, hi):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


def _call_then_quote(lead, call, output, answer):
    """The one reply shape every tool conversation has: a fixed line naming the tool, the call, its
    output, and straight away the answer line, quoted from the output. A small model learns a copy it
    sees in one fixed place; restating the call or the passage before the answer gave it more to get wrong."""
    return [{"type": "text", "text": lead}, {"type": "python", "text": call},
            {"type": "python_output", "text": output}, _final(answer)]


def _final(answer):
    return {"type": "text", "text": f"#### {answer}"}


def _calc_problem(rng):
    a, b = rng.randint(100, 9999), rng.randint(100, 9999)
    op = rng.choice("+-*")
    if op == "*":
        b = rng.randint(12, 999)
    expr = f"{a} {op} {b}"
    answer = str(eval(expr))  # our own two integers and one operator
    q = rng.choice(["What is {e}?", "Compute {e}.", "Calculate {e}.", "What is the value of {e}?"]).format(e=expr)
    return "math", q, _call_then_quote("Let me calculate that.", expr, answer, answer), answer


PYTHON_FORMS = 8


def _python_problem(rng, form=None):
    """A question whose answer needs a little Python (form: which of the PYTHON_FORMS templates, default
    drawn by rng); the tool output is what the REPL prints."""
    form = rng.randrange(PYTHON_FORMS) if form is None else form
    if form == 0:
        s, ch = _letters(rng, 12, 24), rng.choice("aeiou")
        code, out = f"{s!r}.count({ch!r})", str(s.count(ch))
        q = f'How many times does the letter "{ch}" appear in "{s}"?'
    elif form == 1:
        s = _letters(rng, 6, 14)
        code, out = f"print({s!r}[::-1])", s[::-1]
        q = f'Reverse the string "{s}".'
    elif form == 2:
        s = _letters(rng, 6, 12)
        code, out = f"print(''.join(sorted({s!r})))", "".join(sorted(s))
        q = f'Sort the letters of "{s}" alphabetically.'
    elif form == 3:
        xs = [rng.randint(-50, 300) for _ in range(rng.randint(5, 10))]
        code, out = f"sum({xs})", str(sum(xs))
        q = f"What is the sum of the numbers {xs}?"
    elif form == 4:  # two calls: the list lives in the REPL between them
        xs = [rng.randint(1, 999) for _ in range(rng.randint(6, 12))]
        q = f"What is the largest number minus the smallest number in {xs}?"
        answer = str(max(xs) - min(xs))
        parts = [{"type": "text", "text": "I will store the list first."},
                 {"type": "python", "text": f"python:\nxs = {xs}\nlen(xs)"},
                 {"type": "python_output", "text": str(len(xs))},
                 {"type": "python", "text": "python:\nmax(xs) - min(xs)"}, {"type": "python_output", "text": answer},
                 _final(answer)]
        return "python", q, parts, answer
    elif form == 5:
        n = rng.randint(4, 9)
        xs = [rng.randint(1, 200) for _ in range(n)]
        xs[-1] += (-sum(xs)) % n  # a whole-number mean
        code, out = f"xs = {xs}\nsum(xs) // len(xs)", str(sum(xs) // n)
        q = f"What is the mean of {xs}?"
    elif form == 6:
        d1 = datetime.date(rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28))
        d2 = d1 + datetime.timedelta(days=rng.randint(5, 900))
        code = ("from datetime import date\n"
                f"(date({d2.year}, {d2.month}, {d2.day}) - date({d1.year}, {d1.month}, {d1.day})).days")
        out = str((d2 - d1).days)
        q = f"How many days are there from {d1.isoformat()} to {d2.isoformat()}?"
    else:
        d = datetime.date(rng.randint(1900, 2050), rng.randint(1, 12), rng.randint(1, 28))
        code = f"from datetime import date\nprint(date({d.year}, {d.month}, {d.day}).strftime('%A'))"
        out = d.strftime("%A")
        q = f"What day of the week is {d.isoformat()}?"
    return "python", q, _call_then_quote("I will use Python.", f"python:\n{code}", out, out), out


def _search_problem(rng, split):
    pool = entities(split)
    kind, name, doc, qa = rng.choice(pool)
    q, answer, _ = rng.choice(qa)
    other = doc
    while other == doc:  # the index answers k=2 passages; the second is some other document
        other = rng.choice(pool)[2]
    # The query is the question itself: its rare words (the invented name) put the entity's document
    # first in the real index, which the held-out questions were checked against (dev/notes_tools.md).
    output = format_passages([doc, other])
    return "facts", q, _call_then_quote("Let me search for that.", f"search: {q}", output, answer), answer


def _problem(rng, kind, split):
    if kind == "calculator":
        return _calc_problem(rng)
    if kind == "python":
        return _python_problem(rng)
    return _search_problem(rng, split)


def _conversation(group, question, parts, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
            "group": group, "answer": answer}


KINDS = ("calculator", "python", "search")


class ToolUse(Task):
    """Training conversations that call the tools (size of them, kinds in turn), never a held-out question."""

    def __init__(self, size=3000, seed=0, kinds=KINDS, **kwargs):
        super().__init__(**kwargs)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown tool kinds {unknown}; expected some of {KINDS}")
        self.size, self.seed, self.kinds = size, seed, tuple(kinds)
        self.name = ",".join(self.kinds)  # describe_tasks tells the per-tool tasks of a mixture apart

    def num_examples(self):
        return self.size

    def get_example(self, index):
        # the kinds are part of the seed: per-tool tasks with one seed draw different numbers
        rng = random.Random(f"{self.seed}:{index}:{self.name}")
        kind = self.kinds[index % len(self.kinds)]
        while True:
            group, q, parts, answer = _problem(rng, kind, "train")
            if kind == "search" or not _held_out(q):  # facts are held out by entity already
                return _conversation(group, q, parts, answer)


class CopyDrill(Task):
    """Conversations of several turns (size of them) whose answers can only be copied from the context: the
    same calculator and search forms as ToolUse, but every search is about a newly invented entity (its
    document exists only in this conversation's tool output, so nothing can be memorised), plus turns that
    repeat a number, name or expression verbatim. The d4 model learned the tool format from ToolUse yet
    copied neither the question into the call nor the output into the answer; this puts many copies into
    few tokens. Never a held-out question, never a name of the indexed fact corpus."""

    def __init__(self, size=3000, seed=0, turns=3, **kwargs):
        super().__init__(**kwargs)
        if turns < 1:
            raise ValueError(f"turns must be >= 1, got {turns}")
        self.size, self.seed, self.turns = size, seed, turns

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(f"copy:{self.seed}:{index}")
        messages = []
        for _ in range(self.turns):
            question, parts = _copy_turn(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]
        return {"messages": messages}


def _fresh_name(rng):
    """An invented name that is not one of the indexed entities (so a drill never teaches a corpus fact)."""
    while True:
        name = _name(rng, rng.choice((2, 3)))
        if name not in _corpus_names():
            return name


@functools.cache
def _corpus_names():
    return {e[1] for e in _entities()}


def _copy_turn(rng):
    """(question, assistant parts) of one drill turn: a calculator call, a search about a fresh entity, or an echo."""
    kind = rng.choice(("calc", "search", "search", "echo"))
    if kind == "calc":
        while True:
            _, q, parts, _ = _calc_problem(rng)
            if not _held_out(q):
                return q, parts
    if kind == "search":
        # the entity's own document first, then another one's, like the index answers: [(doc, qa), (doc, qa)]
        docs = [_entity(rng, rng.choice(("island", "person", "mountain")), _fresh_name(rng)) for _ in range(2)]
        q, answer, _ = rng.choice(docs[0][1])
        output = format_passages([docs[0][0], docs[1][0]])
        return q, _call_then_quote("Let me search for that.", f"search: {q}", output, answer)
    what = rng.choice(("number", "name", "expression"))
    if what == "number":
        payload = str(rng.randint(10, 999999))
    elif what == "name":
        payload = _fresh_name(rng)
    else:
        payload = f"{rng.randint(100, 9999)} {rng.choice('+-*')} {rng.randint(12, 9999)}"
    return f"Repeat exactly: {payload}", [{"type": "text", "text": payload}]


GROUPS = ("math", "python", "facts")


class ToolsEval(Task):
    """Held-out problems, per_group of each group (math: calculator arithmetic, python: text/list/date
    problems, facts: invented facts only the index holds). Generative; exact answer after '####'."""

    def __init__(self, per_group=24, seed=12345, group=None, **kwargs):
        super().__init__(**kwargs)
        if group is not None and group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        self.rows = []
        rng = random.Random(seed)
        for kind, name in zip(KINDS, GROUPS):
            seen = set()
            while len(seen) < per_group:
                _, q, parts, answer = _problem(rng, kind, "test")
                if q in seen or (kind != "search" and not _held_out(q)):
                    continue
                seen.add(q)
                if group is None or name == group:  # all groups are drawn, so each one's problems never change
                    self.rows.append(_conversation(name, q, parts, answer))

    eval_type = "generative"

    def evaluate(self, conversation, assistant_response):
        return final_answer(assistant_response) == normalize(conversation["answer"])


def normalize(text):
    return " ".join(text.strip().strip(".").replace(",", "").split()).lower()


def final_answer(response):
    """The text after the last '####' on its line, normalized (case, commas, spaces); None without one."""
    if not isinstance(response, str) or "####" not in response:
        return None
    return normalize(response.rsplit("####", 1)[1].split("\n")[0])
