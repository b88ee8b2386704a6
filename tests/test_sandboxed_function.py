"""Calling a function of an untrusted program from trusted code (nanochat/sandbox/function.py): values come
back as plain data, and every way the program can misbehave ends in CallFailed, never in a value."""

import time

import pytest

from nanochat.sandbox.function import CallFailed, SandboxedFunction


@pytest.fixture(autouse=True)
def code_runs(monkeypatch):
    """The real runner: in the sandbox, or where none can be made here, with its Python guards alone."""
    from nanochat.sandbox import boundary as sandbox
    if not sandbox.isolation()[0]:
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")


def test_calls_return_plain_values():
    program = ("import collections\n"
               "def f(x, *rest, scale=1):\n"
               "    return {'x': x * scale, 'rest': rest, 'count': collections.Counter('aab'), 'set': {1, 2}}\n")
    with SandboxedFunction(program, "f") as f:
        assert f(2, "a", (3,), scale=3) == {"x": 6, "rest": ("a", (3,)), "count": {"a": 2, "b": 1}, "set": {1, 2}}
        assert type(f(1)["count"]) is dict
        assert f.calls == 2 and f.failure is None


def test_state_lives_across_calls_in_one_child():
    program = "seen = []\ndef f(x):\n    seen.append(x)\n    return list(seen)\n"
    with SandboxedFunction(program, "f") as f:
        assert [f(i) for i in range(3)] == [[0], [0, 1], [0, 1, 2]]


def test_an_object_with_behaviour_is_not_a_value():
    program = "class Yes:\n    def __eq__(self, other):\n        return True\ndef f():\n    return Yes()\n"
    with SandboxedFunction(program, "f") as f:
        with pytest.raises(CallFailed, match="not plain data") as e:
            f()
    assert "Yes" in str(e.value) and f.calls == 0


@pytest.mark.parametrize("body, why", [
    ("raise ValueError('nope')", "ValueError: nope"),
    ("raise SystemExit(0)", "SystemExit"),
    ("raise KeyboardInterrupt", "KeyboardInterrupt"),
    ("import os\n    os._exit(0)", "ended"),
    ("import sys\n    del sys.modules['posix']\n    import posix\n    posix.kill(posix.getpid(), 9)", "ended"),  # past the guard
])
def test_a_failed_call_raises_and_so_does_every_later_one(body, why):
    with SandboxedFunction(f"def f():\n    {body}\n", "f") as f:
        with pytest.raises(CallFailed, match=why):
            f()
        with pytest.raises(CallFailed, match=why):  # the first failure sticks
            f()
    assert not isinstance(CallFailed("x"), Exception)  # a checker's `except Exception:` cannot swallow it


@pytest.mark.parametrize("program, why", [
    ("def g():\n    pass\n", "defines no function 'f'"),
    ("f = 3\n", "defines no function 'f'"),
    ("def f(:\n", "SyntaxError"),
    ("import sys\nsys.exit(0)\ndef f():\n    return 1\n", "SystemExit"),
    ("import os\nos._exit(0)\n", "ended"),
])
def test_a_program_that_does_not_load_fails_at_start(program, why):
    with pytest.raises(CallFailed, match=why):
        with SandboxedFunction(program, "f"):
            pass


def test_deadlines_per_call_and_in_all():
    t0 = time.time()
    with SandboxedFunction("def f(t):\n    while t:\n        pass\n    return 1\n", "f", timeout=5.0, call_timeout=0.5) as f:
        assert f(0) == 1
        with pytest.raises(CallFailed, match="deadline"):
            f(1)
    assert time.time() - t0 < 4
    t0 = time.time()
    with pytest.raises(CallFailed, match="deadline"):
        with SandboxedFunction("while True:\n    pass\n", "f", timeout=1.0):
            pass
    assert time.time() - t0 < 4


def test_memory_and_output_floods_fail_the_call():
    with SandboxedFunction("def f():\n    return 'x' * (64 << 20)\n", "f") as f:
        with pytest.raises(CallFailed, match="limit is"):  # too big to come back as a value
            f()
    with SandboxedFunction("def f():\n    while True:\n        print('y' * 10000)\n", "f", call_timeout=1.0) as f:
        with pytest.raises(CallFailed, match="deadline"):
            f()


def test_arguments_must_be_plain_data():
    with SandboxedFunction("def f(x):\n    return x\n", "f") as f:
        with pytest.raises(CallFailed, match="arguments are not plain data"):
            f(object())


def test_refused_without_a_sandbox_unless_opted_in(monkeypatch):
    from nanochat.sandbox import boundary as sandbox
    monkeypatch.setattr(sandbox, "_isolation", (False, "bubblewrap is not installed"))
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "0")
    with pytest.raises(CallFailed, match="not run: bubblewrap is not installed"):
        with SandboxedFunction("def f():\n    return 1\n", "f"):
            pass
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    with SandboxedFunction("def f():\n    return 1\n", "f") as f:  # the runner's guards alone
        assert f() == 1
