"""
Run untrusted Python written by the model (tool calls, HumanEval solutions); knows nothing of models or tasks.

`execute_code(code)` runs arbitrary code in a fresh `python -I -S -B` child process (the runner,
  nanochat/sandbox/runner.py) and reports its output and how it ended. Two layers:
    1. The boundary (nanochat/sandbox/boundary.py): bubblewrap namespaces, a read-only root without the project,
       /etc or anyone's home, no network, a size-capped private /tmp (the only writable place), an
       unprivileged host uid whoever calls, seccomp against new processes and unaccounted memory, and a
       cgroup per run capping memory and tasks where the host allows one. If that is not available,
       the code is refused unless the user passed --unsafe-exec (or set NANOCHAT_UNSAFE_EXEC=1); then it
       runs with layer 2 only, in a temp dir that is deleted afterwards.
    2. The runner's own limits and guards (rlimits on memory, CPU, files, tasks; processes, signals,
       sockets, ctypes and writes outside its folder refused): they catch accidents and give readable
       errors, and the code could undo them, which is why layer 1 exists.
  A wall-clock timeout kills the child's whole process group and the sandbox with it. stdout/stderr
  are captured and truncated to `MAX_OUTPUT_BYTES` each.

  How the code ended: the child writes it to a private status pipe, prefixed by a random nonce the
  parent sent on stdin. A status without the nonce, extra bytes on the pipe, a SystemExit, os._exit or
  a killed child are never `completed`. That is good enough for a tool's output, not for a verdict: code
  in the same process can read the nonce (sys._getframe(1).f_locals). Verdicts therefore never come
  from here: nanochat.sandbox.function runs the trusted test code in the caller's process and only
  the function under test in the sandbox (this runner's `--serve` mode), with plain data in between.

The calculator's arithmetic does not run code at all: nanochat/tools/calculator.py.
"""

import os
import secrets
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from nanochat.sandbox import boundary
from nanochat.sandbox.launch import start_runner
from nanochat.sandbox.runner import MAX_WRITE_BYTES

MAX_OUTPUT_BYTES = 64 * 1024      # per stream; the rest is read and dropped
_TRUNCATED = "\n...[output truncated]"


@dataclass
class ExecutionResult:
    success: bool
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    timed_out: bool = False
    memory_exceeded: bool = False
    completed: bool = False  # the code ran to its last line (not sys.exit, not killed): what a verdict needs

    def __repr__(self):
        def short(s, n=200):
            return s if s is None or len(s) <= n else s[:n] + "..."
        parts = [f"success={self.success}"]
        if self.timed_out:
            parts.append("timed_out=True")
        if self.memory_exceeded:
            parts.append("memory_exceeded=True")
        if self.error is not None:
            parts.append(f"error={short(self.error)!r}")
        parts.append(f"stdout={short(self.stdout)!r}")
        if self.stderr:
            parts.append(f"stderr={short(self.stderr)!r}")
        return f"ExecutionResult({', '.join(parts)})"


def _read_capped(stream, sink, limit):
    """Read a pipe to EOF keeping at most `limit` bytes, so a print loop can't eat our memory."""
    with stream:
        while data := stream.read1(65536):
            if len(sink["kept"]) < limit:
                sink["kept"] += data[:limit - len(sink["kept"])]
            sink["total"] += len(data)


def _decode(sink):
    text = sink["kept"].decode("utf-8", errors="replace")
    return text + _TRUNCATED if sink["total"] > len(sink["kept"]) else text


_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        print(f"[nanochat.execution] {message}", file=sys.stderr, flush=True)


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int = 256 * 2**20,
                 max_write_bytes: int = MAX_WRITE_BYTES) -> ExecutionResult:
    """Run `code` in the sandbox; never raises for anything the code does."""
    policy, message = boundary.exec_policy()
    if policy != "isolated":  # refused, or unisolated (--unsafe-exec): said once per message
        _warn_once(message)
    if policy == "refuse":
        return ExecutionResult(success=False, error=f"not run: {message}")
    nonce = secrets.token_hex(16)
    status_r, status_w = os.pipe()  # the child reports how the code ended here, apart from its stdout/stderr
    runner = None
    try:
        runner = start_runner(policy, "--child", [str(status_w), str(timeout), str(int(max_memory_bytes))],
                              max_memory_bytes=max_memory_bytes, max_write_bytes=max_write_bytes,
                              pass_fds=(status_w,), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        os.close(status_w)
        status_w = None
        proc = runner.proc
        out, err = {"kept": b"", "total": 0}, {"kept": b"", "total": 0}
        readers = [threading.Thread(target=_read_capped, args=(stream, sink, MAX_OUTPUT_BYTES), daemon=True)
                   for stream, sink in ((proc.stdout, out), (proc.stderr, err))]
        for t in readers:
            t.start()
        try:
            proc.stdin.write(nonce.encode() + b"\n" + code.encode("utf-8", errors="surrogatepass"))
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the child died before reading its code; its exit status tells why
        timed_out = False
        try:
            proc.wait(timeout=timeout + (1.0 if policy == "isolated" else 0.0))  # + the sandbox's start-up
        except subprocess.TimeoutExpired:
            timed_out = True
        runner.close()  # on timeout, and anything left behind after a normal exit
        for t in readers:
            t.join(timeout=2.0)
        status = _read_status(status_r)
        result = _make_result(status, nonce, proc.returncode, _decode(out), _decode(err), timed_out, timeout)
        if runner.oom_killed and not result.completed:
            result.memory_exceeded, result.timed_out = True, False
            limit_mib = (max_memory_bytes + max_write_bytes) // 2**20
            result.error = (f"MemoryError: the sandbox's memory limit ({limit_mib} MiB, "
                            "/tmp included) was reached and the program was killed")
        return result
    except Exception as e:  # failing to start the child etc.: report, don't crash the caller
        return ExecutionResult(success=False, error=f"sandbox failure: {type(e).__name__}: {e}")
    finally:
        for fd in (status_r, status_w):
            if fd is not None:
                os.close(fd)
        if runner is not None:  # (stdout/stderr are closed by their reader threads)
            runner.close()
            try:
                runner.proc.stdin.close()
            except OSError:
                pass


def _read_status(fd):
    """Whatever the child wrote to the status pipe (non-blocking: a stray holder of the write end can't hang us)."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
            if len(data) > MAX_OUTPUT_BYTES:
                break
    except BlockingIOError:
        pass
    return data.decode("utf-8", errors="replace")


def _make_result(status, nonce, returncode, stdout, stderr, timed_out, timeout):
    if timed_out:
        return ExecutionResult(False, stdout, stderr, f"timed out after {timeout:g} seconds", timed_out=True)
    if status:
        head, _, rest = status.partition("\n")
        kind, _, message = rest.partition("\n")
        if head != nonce or kind not in ("ok", "exit", "error", "memory") or returncode != 0:
            return ExecutionResult(False, stdout, stderr, "the status report was forged or garbled")
        if kind == "ok":
            return ExecutionResult(True, stdout, stderr, completed=True)
        if kind == "exit" and message == "0":  # sys.exit(0): a fine way to end a script, but not a finished check
            return ExecutionResult(True, stdout, stderr)
        if kind == "exit":
            return ExecutionResult(False, stdout, stderr, f"SystemExit: {message}")
        return ExecutionResult(False, stdout, stderr, message, memory_exceeded=(kind == "memory"))
    # No status: the child died (signal, os._exit, interpreter crash) before it could report.
    if returncode is not None and returncode < 0:
        if -returncode == signal.SIGXCPU:
            return ExecutionResult(False, stdout, stderr, "CPU time limit exceeded", timed_out=True)
        try:
            error = f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            error = f"killed by signal {-returncode}"
    else:
        error = f"exited with code {returncode} without finishing"
    memory = "MemoryError" in stderr or "Cannot allocate memory" in stderr
    return ExecutionResult(False, stdout, stderr, error, memory_exceeded=memory)
