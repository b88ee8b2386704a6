"""The tools the model calls while it writes a reply; they know nothing of models or tokens (the engine
hands them decoded call text and forces their output back).

    registry.py    which tools are on, how a call's text picks one, per-conversation sessions, the python REPL
    calculator.py  the calculator's arithmetic: an ast walker, never runs code
    search.py      BM25 search over a local corpus (one SQLite FTS5 file)
"""
