"""The house rules, checked on the code as it is: imports point down (scripts -> tasks -> nanochat add-on
packages -> the spine), no import cycles, no function over 80 lines, every module says what it is for."""
import ast
import functools
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("nanochat", "tasks", "scripts")
ADDONS = ("serve", "lora", "continual", "tools", "hf")  # the spine (flat nanochat/*.py) imports none of these
MAX_FUNCTION_LINES = 80


@functools.lru_cache(maxsize=None)
def modules():
    """{dotted name: parsed tree} of every module in nanochat/, tasks/ and scripts/."""
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def imports(tree, known):
    """The project modules a module imports anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n:
                found.add(n)
    return found


@functools.lru_cache(maxsize=None)
def graph():
    mods = modules()
    return {name: imports(tree, mods) - {name} for name, tree in mods.items()}, mods


def test_imports_point_down():
    g, _ = graph()
    bad = []
    for name, deps in g.items():
        for d in deps:
            top, dtop = name.split(".")[0], d.split(".")[0]
            if LAYERS.index(dtop) > LAYERS.index(top):
                bad.append(f"{name} -> {d} (a lower floor imports a higher one)")
            spine = top == "nanochat" and name.count(".") == 1
            if spine and d.split(".")[1:2] and d.split(".")[1] in ADDONS:
                bad.append(f"{name} -> {d} (the spine imports an add-on package)")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    g, _ = graph()
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = "open"
        for d in sorted(g.get(n, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[n] = "done"

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_long_functions():
    _, mods = graph()
    long = []
    for name, tree in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(sorted(long))


def test_every_module_opens_with_its_job():
    _, mods = graph()
    silent = [name for name, tree in mods.items()
              if not name.endswith(("scripts", "tasks")) and name not in ("nanochat", "scripts", "tasks")
              and not (ast.get_docstring(tree) or "").strip()]
    assert not silent, "modules without a docstring: " + ", ".join(sorted(silent))
