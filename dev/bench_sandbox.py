"""Benchmark of the per-call cost of running generated code (numbers go to dev/notes_security.md, never into tests).

    python -m dev.bench_sandbox [--calls 20] [--rounds 4] [--tree DIR]

Times execute_code("print(1)") with the boundary's layers as this host has them, without the cgroup, and
without any sandbox (--unsafe-exec); a SandboxedFunction's start + one call (what each HumanEval problem
pays); and, with --tree, execute_code of another checkout (say an older commit, from `git archive`),
for before/after numbers on the same machine. Each variant runs in its own process, and the variants
take turns in `rounds` rounds of calls/rounds calls each, so that load from other jobs on the machine
falls on all of them alike. Prints median, p90 and min per call in ms.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each variant: code run in a fresh interpreter with sys.path[0] = the tree; it prints a JSON list of ms.
_TIMER = """
import json, sys, time
sys.path.insert(0, {tree!r})
{setup}
def once():
{call}
once()  # warm-up: the isolation probe, imports
times = []
for _ in range({n}):
    t = time.perf_counter()
    once()
    times.append((time.perf_counter() - t) * 1000)
print(json.dumps(times))
"""
_EXECUTE = "    r = execute_code('print(1)')\n    assert r.success and r.stdout == '1\\n', r\n"
VARIANTS = {
    "execute_code, all layers": ("from nanochat.execution import execute_code", _EXECUTE),
    "execute_code, no cgroup": ("from nanochat.sandbox import cgroup\ncgroup.create = lambda *a: None\n"
                                "from nanochat.execution import execute_code", _EXECUTE),
    "execute_code, no sandbox (--unsafe-exec)": (
        "from nanochat.sandbox import boundary as sandbox\nsandbox._isolation = (False, 'bench')\nsandbox.allow_unsafe_exec()\n"
        "from nanochat.execution import execute_code", _EXECUTE),
    "SandboxedFunction start + 1 call": (
        "from nanochat.sandbox.function import SandboxedFunction",
        "    with SandboxedFunction('def f(x):\\n    return x + 1\\n', 'f') as f:\n        assert f(1) == 2\n"),
}


def run_variant(tree, setup, call, n):
    code = _TIMER.format(tree=tree, setup=setup, call=call, n=n)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tree, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"variant failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20, help="timed calls per variant (split over the rounds)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tree", default="", help="another checkout's root: time its execute_code too")
    args = ap.parse_args()
    variants = {name: (ROOT,) + v for name, v in VARIANTS.items()}
    if args.tree:
        variants[f"execute_code of {args.tree}"] = (os.path.abspath(args.tree), VARIANTS["execute_code, all layers"][0], _EXECUTE)
    sys.path.insert(0, ROOT)
    from nanochat.sandbox import boundary as sandbox
    print(f"host: {sandbox.isolation()[1]}")
    per_round = max(1, args.calls // args.rounds)
    times = {name: [] for name in variants}
    t0 = time.time()
    for _ in range(args.rounds):
        for name, (tree, setup, call) in variants.items():
            times[name] += run_variant(tree, setup, call, per_round)
    print(f"{per_round * args.rounds} calls per variant in {args.rounds} rounds, {time.time() - t0:.0f} s; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus\n")
    print(f"| variant | median ms | p90 ms | min ms |\n|---|---|---|---|")
    for name, ts in times.items():
        ts = sorted(ts)
        print(f"| {name} | {statistics.median(ts):.1f} | {ts[int(0.9 * (len(ts) - 1))]:.1f} | {ts[0]:.1f} |")


if __name__ == "__main__":
    main()
