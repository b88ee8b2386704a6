"""Call one function of an untrusted program from trusted code, as if it were local: the program is loaded
once in a sandboxed child (the runner in --serve mode, under the kernel boundary and limits), each call sends
its arguments there and gets back plain data (nanochat/sandbox/plain_data.py), so nothing
the program does runs in, or speaks for, the caller's process. What it returns is only ever a value.

    with SandboxedFunction(program, "add") as add:
        assert add(2, 3) == 5          # 5 is an int made here; no __eq__ of the program's can answer

A call that raises in the child, returns something that is not plain data, hangs past its deadline, or
kills the child raises CallFailed in the caller, and so does every later call: `failure` says what went
wrong first. CallFailed is a BaseException, so a checker's `except Exception:` cannot swallow it.
"""

import os
import subprocess
import time

from nanochat.sandbox import boundary, plain_data
from nanochat.sandbox.launch import start_runner
from nanochat.sandbox.runner import MAX_WRITE_BYTES


class CallFailed(BaseException):
    """The sandboxed function did not give back a plain value."""


class SandboxedFunction:
    """The function `entry_point` of `program`, running in the sandbox. Deadlines: `call_timeout` seconds
    per call and `timeout` for everything (loading included) from start(); memory, tasks and files are
    capped as for execute_code. `calls` counts the calls that returned a value."""

    def __init__(self, program, entry_point, timeout=10.0, call_timeout=5.0, max_memory_bytes=256 * 2**20,
                 max_write_bytes=MAX_WRITE_BYTES):
        self.program, self.entry_point = program, entry_point
        self.timeout, self.call_timeout = timeout, call_timeout
        self.max_memory_bytes, self.max_write_bytes = max_memory_bytes, max_write_bytes
        self.calls = 0
        self.failure = None
        self._runner = self._requests = self._replies = None

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        """Start the child and load the program; CallFailed if either fails (the program's error included)."""
        policy, message = boundary.exec_policy()
        if policy == "refuse":
            self._fail(f"not run: {message}")
        self._deadline = time.monotonic() + self.timeout
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        self._requests, self._replies = request_w, reply_r
        try:
            self._runner = start_runner(
                policy, "--serve", [str(reply_w), str(self.timeout), str(int(self.max_memory_bytes))],
                max_memory_bytes=self.max_memory_bytes, max_write_bytes=self.max_write_bytes, pass_fds=(reply_w,),
                stdin=request_r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, RuntimeError, TimeoutError) as e:
            self._fail(f"sandbox failure: {type(e).__name__}: {e}")
        finally:
            os.close(request_r)
            os.close(reply_w)
        os.set_blocking(request_w, False)  # a child that stops reading must not block us past the deadline
        reply = self._exchange({"program": self.program, "entry_point": self.entry_point}, self._deadline)
        if reply != {"ready": True}:
            self._fail(f"the program did not load: {self._error_of(reply)}")

    def __call__(self, *args, **kwargs):
        if self.failure is not None:
            raise CallFailed(self.failure)
        if self._runner is None:
            raise RuntimeError("start() the SandboxedFunction first (or use it in a with block)")
        try:
            request = plain_data.encode([list(args), kwargs])
        except plain_data.PlainDataError as e:  # the caller's mistake, but a check that can't run is failed
            self._fail(f"the arguments are not plain data: {e}")
        reply = self._exchange(request, min(time.monotonic() + self.call_timeout, self._deadline))
        if type(reply) is dict and list(reply) == ["value"]:
            self.calls += 1
            return reply["value"]
        self._fail(f"{self.entry_point}{self._short(args)} failed: {self._error_of(reply)}")

    def _exchange(self, message, deadline):
        """Send one frame, wait for the reply frame by `deadline`; any trouble fails the function."""
        try:
            payload = message if isinstance(message, bytes) else plain_data.encode(message)
            plain_data.write_frame(self._requests, payload, deadline)
            return plain_data.decode(plain_data.read_frame(self._replies, deadline))
        except TimeoutError:
            self._fail(f"no answer within the deadline ({self.call_timeout:g} s a call, {self.timeout:g} s in all)")
        except (EOFError, BrokenPipeError):
            self._fail(self._death())
        except plain_data.PlainDataError as e:
            self._fail(f"the program answered something that is not plain data: {e}")
        except OSError as e:
            self._fail(f"sandbox failure: {e}")

    def _death(self):
        self._stop()
        if self._runner.oom_killed:
            return "the program was killed at the sandbox's memory limit"
        code = self._runner.proc.returncode
        return f"the program ended (exit status {code})" if code is not None else "the program closed its channel"

    @staticmethod
    def _error_of(reply):
        if type(reply) is dict and list(reply) == ["error"] and type(reply["error"]) is str:
            return reply["error"][:1000]
        return f"an unexpected answer {str(reply)[:200]}"

    @staticmethod
    def _short(args):
        text = repr(tuple(args))
        return text if len(text) <= 200 else text[:200] + "...)"

    def _fail(self, why):
        if self.failure is None:
            self.failure = why
        self._stop()
        raise CallFailed(self.failure)

    def _stop(self):
        if self._runner is not None:
            self._runner.close()

    def close(self):
        """Stop the child (killing whatever it left running) and close the channel."""
        self._stop()
        for fd in (self._requests, self._replies):
            if fd is not None:
                os.close(fd)
        self._requests = self._replies = None
