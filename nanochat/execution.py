"""
Run untrusted Python written by the model (tool calls, HumanEval solutions); knows nothing of models or tasks.

`execute_code(code)` runs arbitrary code in a fresh `python -I -S -B` child process (this very file,
  run as a script: the runner) and reports its output and how it ended. Two layers:
    1. The boundary (nanochat.sandbox): bubblewrap namespaces, a read-only root without the project,
       /etc or anyone's home, no network, a size-capped private /tmp (the only writable place), an
       unprivileged host uid whoever calls, seccomp against new processes and unaccounted memory, and a
       cgroup per run capping memory and tasks where the host allows one. If that is not available,
       the code is refused unless the user passed --unsafe-exec (or set NANOCHAT_UNSAFE_EXEC=1); then it
       runs with layer 2 only, in a temp dir that is deleted afterwards.
    2. The runner's own limits and guards: rlimits on memory (RLIMIT_AS: a MemoryError is reported as
       `memory_exceeded`), CPU seconds, file size, open files (MAX_OPEN_FILES: bounds pipe and socket
       buffers), POSIX message queues and tasks (MAX_THREADS: RLIMIT_NPROC, which the kernel counts per
       sandbox since the program has its own host uid there); process creation, signalling, raising
       rlimits, sockets and ctypes refused; writes outside the working dir refused. These catch
       accidents and give readable errors; the code can dig the originals back out of the interpreter
       (re-importing posix, for one), which is why layer 1 exists.
  A wall-clock timeout kills the child's whole process group and the sandbox with it. stdout/stderr
  are captured and truncated to `MAX_OUTPUT_BYTES` each.

  How the code ended: the child writes it to a private status pipe, prefixed by a random nonce the
  parent sent on stdin. A status without the nonce, extra bytes on the pipe, a SystemExit, os._exit or
  a killed child are never `completed`. That is good enough for a tool's output, not for a verdict: code
  in the same process can read the nonce (sys._getframe(1).f_locals). Verdicts therefore never come
  from here: nanochat.sandboxed_function runs the trusted test code in the caller's process and only
  the function under test in the sandbox (this runner's `--serve` mode), with plain data in between.

The calculator's arithmetic does not run code at all: nanochat/tools/calculator.py.
"""

import math
import os
import sys
import errno
import secrets
import signal
import tempfile
import threading
import subprocess
from dataclasses import dataclass

MAX_OUTPUT_BYTES = 64 * 1024      # per stream; the rest is read and dropped
MAX_FILE_BYTES = 64 * 2**20       # largest single file (RLIMIT_FSIZE)
MAX_WRITE_BYTES = 64 * 2**20      # all files together: the size of the sandbox's /tmp
MAX_THREADS = 16                  # tasks (the main thread + threads) the program may have: RLIMIT_NPROC and the cgroup
MAX_OPEN_FILES = 64               # RLIMIT_NOFILE: also caps what pipes and sockets can buffer (~1 MiB each at most)
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


# -----------------------------------------------------------------------------
# Parent side

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


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        print(f"[nanochat.execution] {message}", file=sys.stderr, flush=True)


class _Unsandboxed:
    """--unsafe-exec without a sandbox: the runner as a plain child process in a temp dir that is deleted
    afterwards (the Python guards and rlimits only). Same interface as nanochat.sandbox.Sandboxed."""
    oom_killed = False

    def __init__(self, argv, pass_fds, popen_kwargs):
        self.workdir = tempfile.mkdtemp(prefix="nanochat-exec-")
        env = {"PATH": "/usr/bin:/bin", "HOME": self.workdir, "TMPDIR": self.workdir, "LANG": "C.UTF-8"}
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-B"] + argv, cwd=self.workdir, env=env,
                                         pass_fds=pass_fds, start_new_session=True, **popen_kwargs)
        except BaseException:
            _rmtree_force(self.workdir)
            raise

    def kill(self):
        _kill_group(self.proc.pid)

    def close(self):
        if self.workdir is None:
            return  # closed already: the group's pid may be someone else's by now
        self.kill()  # the whole group: anything the code started is in it
        self.proc.wait()
        _rmtree_force(self.workdir)
        self.workdir = None


def start_runner(policy, mode, args, *, max_memory_bytes, max_write_bytes=MAX_WRITE_BYTES, pass_fds=(), **popen_kwargs):
    """Start this file as the runner: `mode` is '--child' (run code) or '--serve' (serve one function),
    `args` its arguments before the task limit. Sandboxed when `policy` (sandbox.exec_policy) is
    'isolated', else ('unsafe') unsandboxed. -> an object with .proc (Popen), .kill(), .close() (kills
    everything and cleans up) and, after close, .oom_killed. popen_kwargs: stdin, stdout, stderr."""
    from nanochat import sandbox
    here = os.path.dirname(os.path.abspath(__file__))
    if policy != "isolated":
        return _Unsandboxed([os.path.join(here, "execution.py"), mode] + args + ["0"], pass_fds, popen_kwargs)
    runner = sandbox.RUNNER_DIR + "/runner.py"
    files = {runner: os.path.join(here, "execution.py"),
             sandbox.RUNNER_DIR + "/plain_data.py": os.path.join(here, "plain_data.py")}
    argv = [sandbox.python_executable(), "-I", "-S", "-B", runner, mode] + args + [str(sandbox.nproc_rlimit(MAX_THREADS))]
    return sandbox.start(argv, files, max_memory_bytes=max_memory_bytes, max_write_bytes=max_write_bytes,
                         max_tasks=MAX_THREADS, pass_fds=pass_fds, **popen_kwargs)


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int = 256 * 2**20,
                 max_write_bytes: int = MAX_WRITE_BYTES) -> ExecutionResult:
    """Run `code` in the sandbox; never raises for anything the code does."""
    from nanochat import sandbox
    policy, message = sandbox.exec_policy()
    if policy == "refuse":
        _warn_once(message)
        return ExecutionResult(success=False, error=f"not run: {message}")
    if policy == "unsafe":
        _warn_once(message)
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
            result.error = (f"MemoryError: the sandbox's memory limit ({(max_memory_bytes + max_write_bytes) // 2**20} MiB, "
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


def _rmtree_force(path):
    import shutil
    def onerror(func, p, exc_info):  # the code may have chmod-ed things inside; make them deletable and retry
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)


# -----------------------------------------------------------------------------
# Child side (this file run as `python -I -S -B execution.py --child ...`)

def _set_limits(timeout, max_memory_bytes, max_tasks):
    import resource
    cpu = max(1, math.ceil(timeout)) + 1
    limits = [
        (resource.RLIMIT_AS, max_memory_bytes),   # allocations beyond this fail -> MemoryError
        (resource.RLIMIT_CPU, cpu),               # backstop in case the parent's timer fails
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),  # don't fill the disk from the temp dir
        (resource.RLIMIT_CORE, 0),
        # Tasks of our uid: inside the sandbox the program has a host uid of its own, counted in its own
        # user namespace, so this is the sandbox's task count; unsandboxed, the count is the user's
        # whole, so none (and the kernel does not enforce it for root).
        (resource.RLIMIT_NPROC, max_tasks),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),  # fds already open (the status pipe) stay usable
        (resource.RLIMIT_MSGQUEUE, 0),             # POSIX message queues hold memory outside RLIMIT_AS
    ]
    for which, value in limits:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing us


def _install_guards(sandbox):
    """Replace the dangerous parts of os/posix/_io/_socket etc. with versions that refuse."""
    import io, _io, posix, builtins, resource, _posixsubprocess, _socket

    def refuse(what):
        def refused(*args, **kwargs):
            raise PermissionError(errno.EPERM, f"{what} is disabled in the sandbox")
        refused.__name__ = what
        return refused

    def patch(modules, name, value):
        for mod in modules:
            if hasattr(mod, name):
                setattr(mod, name, value)

    # No new processes and no signalling other ones. Patching the low-level functions covers
    # subprocess (_posixsubprocess.fork_exec, os.posix_spawn), multiprocessing and pty too.
    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
                 "posix_spawn", "posix_spawnp"):
        patch((os, posix), name, refuse(f"os.{name}"))
    patch((signal,), "pidfd_send_signal", refuse("signal.pidfd_send_signal"))
    _posixsubprocess.fork_exec = subprocess._fork_exec = refuse("subprocess")  # subprocess keeps its own reference
    subprocess.Popen._execute_child = refuse("subprocess")
    patch((resource,), "setrlimit", refuse("resource.setrlimit"))
    patch((resource,), "prlimit", refuse("resource.prlimit"))
    sys._current_frames = refuse("sys._current_frames")  # the runner's frames are none of the code's business

    # No network. socket.py (not imported yet under -I -S) subclasses _socket.socket and calls
    # _socket.socket.__init__, which is where the OS socket is created; refuse there unless it
    # only wraps an existing fd (socketpair, which asyncio's event loop needs, is local-only).
    real_socket = _socket.socket
    class NoSocket(real_socket):
        __slots__ = ()  # socket.socket adds its own __weakref__ slot
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:
                raise PermissionError(errno.EPERM, "network access is disabled in the sandbox")
            real_socket.__init__(self, family, type, proto, fileno)
    _socket.socket = _socket.SocketType = NoSocket
    if "socket" in sys.modules:
        sys.modules["socket"].socket = NoSocket
    # ctypes would reach libc directly and undo all of the above.
    sys.modules["ctypes"] = sys.modules["_ctypes"] = None

    # Files: writes only inside the sandbox dir.
    realpath, readlink, getcwd = os.path.realpath, os.readlink, os.getcwd

    def resolve(path, dir_fd=None):
        if isinstance(path, int):  # an fd: find what it refers to
            return readlink(f"/proc/self/fd/{path}")
        path = os.fsdecode(os.fspath(path))
        base = readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else getcwd()
        return realpath(os.path.join(base, path))

    def check(path, dir_fd=None):
        try:
            real = resolve(path, dir_fd)
        except (OSError, TypeError, ValueError):
            real = None
        if real is None or (real != sandbox and not real.startswith(sandbox + os.sep)):
            raise PermissionError(errno.EACCES, "writing outside the sandbox dir is not allowed", str(path))

    def writes(mode):
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    original_open = _io.open
    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and writes(mode):  # an existing fd grants nothing new
            check(file)
        return original_open(file, mode, *args, **kwargs)
    patch((builtins, io, _io), "open", guarded_open)

    class GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and writes(mode):
                check(file)
            super().__init__(file, mode, *args, **kwargs)
    patch((io, _io), "FileIO", GuardedFileIO)

    original_os_open = posix.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check(path, dir_fd)
        return original_os_open(path, flags, mode, dir_fd=dir_fd)
    patch((os, posix), "open", guarded_os_open)

    def guard_paths(name, *params):
        """Wrap os.<name> so that each path argument, given as (position, keyword, its dir_fd keyword),
        must lie inside the sandbox."""
        original = getattr(posix, name, None)
        if original is None:
            return
        def guarded(*args, **kwargs):
            for pos, arg_name, fd_name in params:
                value = args[pos] if pos < len(args) else kwargs.get(arg_name)
                if value is not None:
                    check(value, kwargs.get(fd_name))
            return original(*args, **kwargs)
        guarded.__name__ = name
        patch((os, posix), name, guarded)

    for name in ("remove", "unlink", "rmdir", "mkdir", "mkfifo", "mknod", "chmod", "chown", "lchown",
                 "lchmod", "chflags", "lchflags", "truncate", "utime", "setxattr", "removexattr", "chroot"):
        guard_paths(name, (0, "path", "dir_fd"))
    for name in ("fchmod", "fchown"):
        guard_paths(name, (0, "fd", None))
    for name in ("rename", "replace", "link"):
        guard_paths(name, (0, "src", "src_dir_fd"), (1, "dst", "dst_dir_fd"))
    guard_paths("symlink", (1, "dst", "dir_fd"))  # the link must be inside; writes through it are checked on open


def _child_main(status_fd, timeout, max_memory_bytes, max_tasks):
    import builtins, linecache
    status = os.fdopen(status_fd, "w", encoding="utf-8")
    nonce, _, code = sys.stdin.buffer.read().partition(b"\n")
    nonce, code = nonce.decode("ascii", errors="replace"), code.decode("utf-8", errors="surrogatepass")
    sys.stdin.close()
    sys.stdin = open(os.devnull)  # input() gets EOF
    for stream in (sys.stdout, sys.stderr):  # flush per line so a timed-out run still shows its output
        stream.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=True)

    sandbox = os.path.realpath(os.getcwd())
    _set_limits(timeout, max_memory_bytes, max_tasks)
    _install_guards(sandbox)

    filename = "<sandbox>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # source lines in tracebacks
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(code, filename, "exec"), namespace)
        outcome = "ok\n"
    except MemoryError:
        namespace.clear()  # free what the code allocated so we can still report
        outcome = "memory\nMemoryError: memory limit exceeded"
    except SystemExit as e:
        outcome = "exit\n0" if e.code in (None, 0) else f"exit\n{e.code}"
    except BaseException as e:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # skip our own frame
        outcome = "error\n" + "".join(traceback.format_exception_only(type(e), e)).strip()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    status.write(f"{nonce}\n{outcome}")
    status.close()
    os._exit(0)  # done: threads the code left running don't get to hold the call up until the timeout


def _describe(e):
    import traceback
    return "".join(traceback.format_exception_only(type(e), e)).strip()[:2000]


def _serve_main(reply_fd, timeout, max_memory_bytes, max_tasks):
    """--serve: load one program, then call its function for each request until stdin closes. stdin carries
    frames of plain data (nanochat/plain_data.py, bound next to this file): first {"program", "entry_point"},
    then [args, kwargs] per call; each answer is one frame on reply_fd: {"ready": True} once loaded, then
    {"value": v} or {"error": "..."} per call. The parent believes none of it beyond "this is the value"."""
    import builtins
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import plain_data
    requests = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # input() gets EOF, as in --child
    os.close(null)

    def answer(**message):
        try:
            payload = plain_data.encode(message)
        except plain_data.PlainDataError as e:
            payload = plain_data.encode({"error": f"the function returned something else than plain data: {e}"})
        plain_data.write_frame(reply_fd, payload)

    spec = plain_data.decode(plain_data.read_frame(requests))
    _set_limits(timeout, max_memory_bytes, max_tasks)
    _install_guards(os.path.realpath(os.getcwd()))
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(spec["program"], "<program>", "exec"), namespace)
        function = namespace.get(spec["entry_point"])
        if not callable(function):
            raise NameError(f"the program defines no function {spec['entry_point']!r}")
    except BaseException as e:  # SystemExit and KeyboardInterrupt included: the program did not load
        answer(error=_describe(e))
        os._exit(0)
    answer(ready=True)
    while True:
        try:
            args, kwargs = plain_data.decode(plain_data.read_frame(requests))
        except EOFError:
            os._exit(0)
        try:
            value = function(*args, **kwargs)
        except BaseException as e:
            answer(error=_describe(e))
        else:
            answer(value=value)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child_main(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve_main(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
