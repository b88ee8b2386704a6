"""The tools the assistant can call while it writes a reply (calculator, python REPL, search) and how a
call's text picks one; it knows nothing of models or tokens (the engine feeds it decoded call text).

Chat format (no new special tokens; the existing python/output tokens carry every tool):

    <|python_start|>CALL<|python_end|><|output_start|>RESULT<|output_end|>

CALL is read like this (leading whitespace ignored):
  - `python:` then the code (on the same line or the next ones)  -> the `python` tool, a stateful REPL
  - `search:` then the query                                   -> the `search` tool, BM25 over a local index
  - anything else                                              -> the `calculator` (arithmetic, 'ab'.count('a'),
                                                                  len('abc')), the fast path, no subprocess
A session answers every call with a string, forced back between <|output_start|> and <|output_end|>: the
model never writes a tool's output itself (the engine refuses to sample those markers), so it must get
one. Errors are written so the model can read them ("NameError: name 'x' is not defined", "search: no
passage matches ..."); a tool that is switched off (search without an index) answers that it is not
available, and text the calculator does not accept gets an error naming what it does accept.

Registry and state: `ToolRegistry` says which tools exist and their limits; `registry.session()` makes
the per-conversation state (one per engine row): a `ToolSession` is a callable `str -> str`.

The python REPL keeps state by replaying: every cell that ran (to its end or to its own exception) is
kept, and a new call runs, in one fresh sandboxed process (nanochat.execution.execute_code), the kept
cells with their output thrown away and then the new cell. So variables, functions and imports survive
across calls; side effects are redone and randomness is drawn again on each replay (seed it). A
conversation's earlier replies are part of the state too: the engine reads the python calls already in
the prompt and starts the REPL from them (ToolRegistry.session(history)). This needs nothing from the
sandbox beyond "run this code", keeps no process alive between calls and cannot leak one conversation's
state into another; its cost grows with the history, which the limits below bound.
"""
import os
from dataclasses import dataclass

from nanochat.common import get_base_dir
from nanochat.execution import execute_code
from nanochat.tools.calculator import use_calculator
from nanochat.tools.search import INDEX_FILE, Searcher

TOOL_NAMES = ("calculator", "python", "search")


def parse_call(text):
    """A call's text -> (tool name, argument). 'python: x=1' -> ('python', 'x=1'); '2+3' -> ('calculator', '2+3')."""
    stripped = text.lstrip()
    for name in ("python", "search"):
        prefix = name + ":"
        if stripped.startswith(prefix):
            arg = stripped[len(prefix):]
            # `python:\ncode` and `python: code` both work; keep the code's own indentation otherwise
            arg = arg[1:] if arg.startswith((" ", "\n")) else arg
            return name, arg.strip("\n") if name == "python" else arg.strip()
    return "calculator", text


def trim(text, max_chars):
    """Cut text to max_chars, saying so at the end (the model must see that something is missing)."""
    if len(text) <= max_chars:
        return text
    marker = "\n...[truncated]"
    return text[:max(0, max_chars - len(marker))] + marker


# ---------------------------------------------------------------------------------------------
# python: a REPL over the sandbox

# Runs inside the sandbox. The model's cells share one namespace (_g), apart from the driver's names. Earlier
# cells are replayed with their output dropped; one that raised stops where it raised, as it did the first
# time, and the replay goes on (a REPL keeps what a failed cell did before its error).
_DRIVER = r'''
import ast as _ast, io as _io, sys as _sys
def _run(_cells, _new):
    _g = {"__name__": "__main__", "__builtins__": __builtins__}
    _out = _sys.stdout
    for _c in _cells:
        _sys.stdout = _io.StringIO()
        try:
            exec(compile(_c, "<history>", "exec"), _g)
        except Exception:
            pass
    _sys.stdout = _out
    _tree = _ast.parse(_new, "<python>")
    _last = None
    if _tree.body and isinstance(_tree.body[-1], _ast.Expr):
        _last = _ast.Expression(_tree.body.pop().value)
    exec(compile(_tree, "<python>", "exec"), _g)
    if _last is not None:
        _v = eval(compile(_last, "<python>", "eval"), _g)
        if _v is not None:
            print(repr(_v))
_run(CELLS, NEW)
'''

# Errors that come from the limits or the sandbox, not from the code's own logic: such a cell is not
# kept, since replaying it would fail the same way on every later call.
_NOT_KEPT = ("TimeoutError: the code ran longer", "MemoryError: the code used more", "Error: ")
_SANDBOX_ERRORS = ("not run", "sandbox failure", "killed by signal", "exited with code", "CPU time")


@dataclass
class PythonLimits:
    timeout: float = 5.0                 # seconds per call, replay of the history included
    max_memory_bytes: int = 256 * 2**20
    max_output_chars: int = 1000         # what the model reads back; the rest is cut with a marker
    max_code_chars: int = 4000           # one cell
    max_history_chars: int = 20000       # all kept cells together: bounds the replay cost


class PythonREPL:
    """One conversation's REPL: __call__(code) -> what the model reads (stdout, then the repr of the last
    expression if it is not None; or the error). Cells that raised are kept (what they did before the
    error stays, as in a REPL); cells stopped by a limit or the sandbox, or that do not compile, are not.
    `cells`: earlier cells of the conversation to start from (see ToolRegistry.session)."""

    def __init__(self, limits=None, cells=()):
        self.limits = limits or PythonLimits()
        self.cells = list(cells)

    def __call__(self, code):
        lim = self.limits
        if not code.strip():
            return "Error: empty python call; write code after 'python:'"
        if len(code) > lim.max_code_chars:
            return (f"Error: the code is {len(code)} characters; the limit is {lim.max_code_chars}. "
                    "Split it into smaller calls.")
        if sum(map(len, self.cells)) + len(code) > lim.max_history_chars:
            return (f"Error: this conversation's python history passed {lim.max_history_chars} characters; "
                    "the REPL keeps no more state. Start a new conversation.")
        try:
            compile(code, "<python>", "exec")
        except SyntaxError as e:  # reported without starting a process
            return trim(f"SyntaxError: {e.msg} (line {e.lineno})", lim.max_output_chars)
        except (ValueError, RecursionError, MemoryError) as e:
            return f"Error: could not compile the code ({type(e).__name__})"
        program = _DRIVER.replace("CELLS, NEW", f"{self.cells!r}, {code!r}")
        result = execute_code(program, timeout=lim.timeout, max_memory_bytes=lim.max_memory_bytes)
        out = result.stdout
        if result.success:
            self.cells.append(code)
            return trim(out.rstrip("\n"), lim.max_output_chars)
        if result.timed_out:
            error = f"TimeoutError: the code ran longer than {lim.timeout:g} seconds"
        elif result.memory_exceeded:
            error = f"MemoryError: the code used more than {lim.max_memory_bytes // 2**20} MiB"
        else:
            error = (result.error or "the code failed").strip()
            if not error.startswith(_SANDBOX_ERRORS):
                self.cells.append(code)  # the code's own exception
        return trim((out if out.endswith("\n") or not out else out + "\n") + error, lim.max_output_chars)


# ---------------------------------------------------------------------------------------------
# registry and per-conversation sessions

# What a call gets when its tool cannot answer it: never nothing, or the model would go on to invent an answer.
CALCULATOR_REFUSED = ("Error: the calculator evaluates arithmetic, 'text'.count('x') and len('text') only; "
                      "for other code start the call with python:")
UNAVAILABLE = {"calculator": "Error: the calculator is switched off on this server.",
               "python": "Error: the python tool is switched off on this server.",
               "search": "Error: search is not available on this server (no search index is loaded), so there "
                         "are no results; answer without them."}


class ToolSession:
    """The tools of one conversation: __call__(call text) -> output, always a string (see the module
    docstring). `calls` records (tool, argument, output) of every call, for the CLI and the web server to show."""

    def __init__(self, tools):
        self.tools = tools  # name -> callable(str) -> str | None (only the tools that are on)
        self.calls = []

    def __call__(self, text):
        name, arg = parse_call(text)
        tool = self.tools.get(name)
        output = tool(arg) if tool is not None else UNAVAILABLE[name]
        if output is None:  # the calculator refuses text it cannot evaluate
            output = CALCULATOR_REFUSED if name == "calculator" else f"Error: the {name} tool gave no result."
        self.calls.append((name, arg, output))
        return output


class ToolRegistry:
    """Which tools are on, with their limits. calculator: no state, no limits beyond its own (see
    use_calculator). python: a PythonREPL per session, with `python_limits`. search: `searcher`
    (a nanochat.tools.search.Searcher, or any callable query -> str) when given, else off."""

    def __init__(self, calculator=True, python=True, searcher=None, python_limits=None):
        self.calculator = calculator
        self.python = python
        self.searcher = searcher
        self.python_limits = python_limits or PythonLimits()

    @property
    def names(self):
        on = {"calculator": self.calculator, "python": self.python, "search": self.searcher is not None}
        return [n for n in TOOL_NAMES if on[n]]

    def session(self, history=()):
        """A new conversation's tools. history: the (call text, output text or None) pairs of the calls
        already in the conversation (earlier turns): its python cells are the REPL's starting state, so
        variables survive from one reply to the next even though each reply is a new generation."""
        tools = {}
        if self.calculator:
            tools["calculator"] = use_calculator
        if self.python:
            cells = []
            for call, output in history:
                name, code = parse_call(call)
                if name == "python" and code.strip() and not (output or "").startswith(_NOT_KEPT + ("SyntaxError",)):
                    cells.append(code)
            tools["python"] = PythonREPL(self.python_limits, cells)
        if self.searcher is not None:
            tools["search"] = self.searcher
        return ToolSession(tools)


def make_registry(index="", python=True):
    """What the CLI and the web server serve: calculator and the python REPL, plus search over `index`
    (a folder or file; default <base>/search_index) when there is one there. -> (registry, a line
    saying which tools are on)."""
    path = index or os.path.join(get_base_dir(), "search_index")
    searcher = None
    if index or os.path.exists(os.path.join(path, INDEX_FILE)):
        searcher = Searcher(path)  # an explicit --index that is missing fails here, with the way to build one
    registry = ToolRegistry(python=python, searcher=searcher)
    where = (f" (search: {len(searcher):,} passages in {searcher.path})" if searcher else
             " (no search index: a search call is answered that search is not available; "
             "python -m scripts.build_index builds one)")
    return registry, "tools: " + ", ".join(registry.names) + where
