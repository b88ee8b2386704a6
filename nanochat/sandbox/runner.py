"""The runner: the program that starts inside the sandbox, sets its own limits and guards, then runs the
model's code (--child) or serves one function of it (--serve). It is run as a plain script from a read-only
bind (nanochat/sandbox/launch.py puts it and plain_data.py side by side), so it imports only the standard
library and its neighbour, never nanochat.

Its guards are layer 2 of nanochat/execution.py's docstring: rlimits on memory (RLIMIT_AS: a MemoryError is
reported as `memory_exceeded`), CPU seconds, file size, open files (MAX_OPEN_FILES: bounds pipe and socket
buffers), POSIX message queues and tasks (MAX_THREADS: RLIMIT_NPROC, which the kernel counts per sandbox since
the program has its own host uid there); process creation, signalling, raising rlimits, sockets and ctypes
refused; writes outside the working dir refused. They catch accidents and give readable errors; the code can
dig the originals back out of the interpreter (re-importing posix, for one), which is why the kernel boundary
(nanochat/sandbox/boundary.py) exists.

    python -I -S -B runner.py --child STATUS_FD TIMEOUT MAX_MEMORY MAX_TASKS   (code on stdin, after a nonce line)
    python -I -S -B runner.py --serve REPLY_FD TIMEOUT MAX_MEMORY MAX_TASKS    (plain-data frames on stdin)
"""
import _io
import _posixsubprocess
import _socket
import builtins
import errno
import io
import linecache
import math
import os
import posix
import resource
import signal
import subprocess
import sys
import traceback

MAX_FILE_BYTES = 64 * 2**20       # largest single file (RLIMIT_FSIZE)
MAX_WRITE_BYTES = 64 * 2**20      # all files together: the size of the sandbox's /tmp
MAX_THREADS = 16                  # tasks (the main thread + threads) the program may have: RLIMIT_NPROC and the cgroup
MAX_OPEN_FILES = 64               # RLIMIT_NOFILE: also caps what pipes and sockets can buffer (~1 MiB each at most)


def _set_limits(timeout, max_memory_bytes, max_tasks):
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


def _refuse(what):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EPERM, f"{what} is disabled in the sandbox")
    refused.__name__ = what
    return refused


def _patch(modules, name, value):
    for mod in modules:
        if hasattr(mod, name):
            setattr(mod, name, value)


def _refuse_processes():
    """No new processes and no signalling other ones. Patching the low-level functions covers subprocess
    (_posixsubprocess.fork_exec, os.posix_spawn), multiprocessing and pty too."""
    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
                 "posix_spawn", "posix_spawnp"):
        _patch((os, posix), name, _refuse(f"os.{name}"))
    _patch((signal,), "pidfd_send_signal", _refuse("signal.pidfd_send_signal"))
    _posixsubprocess.fork_exec = subprocess._fork_exec = _refuse("subprocess")  # subprocess keeps its own reference
    subprocess.Popen._execute_child = _refuse("subprocess")
    _patch((resource,), "setrlimit", _refuse("resource.setrlimit"))
    _patch((resource,), "prlimit", _refuse("resource.prlimit"))
    sys._current_frames = _refuse("sys._current_frames")  # the runner's frames are none of the code's business


def _refuse_network():
    """socket.py (not imported yet under -I -S) subclasses _socket.socket and calls _socket.socket.__init__,
    which is where the OS socket is created; refuse there unless it only wraps an existing fd (socketpair,
    which asyncio's event loop needs, is local-only). ctypes would reach libc directly and undo it all."""
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
    sys.modules["ctypes"] = sys.modules["_ctypes"] = None


def _writes_only_inside(sandbox):
    """-> check(path, dir_fd=None): PermissionError unless the path resolves inside the sandbox dir."""
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
    return check


def _guard_opens(check):
    """open(), io.FileIO and os.open for writing go through check; an existing fd grants nothing new."""

    def writes(mode):
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    original_open = _io.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and writes(mode):
            check(file)
        return original_open(file, mode, *args, **kwargs)
    _patch((builtins, io, _io), "open", guarded_open)

    class GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and writes(mode):
                check(file)
            super().__init__(file, mode, *args, **kwargs)
    _patch((io, _io), "FileIO", GuardedFileIO)

    original_os_open = posix.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check(path, dir_fd)
        return original_os_open(path, flags, mode, dir_fd=dir_fd)
    _patch((os, posix), "open", guarded_os_open)


def _guard_path_calls(check):
    """The os calls that change the file system, each path argument through check."""
    def guard_paths(name, *params):
        """Wrap os.<name>: each path argument, given as (position, keyword, its dir_fd keyword), is checked."""
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
        _patch((os, posix), name, guarded)

    for name in ("remove", "unlink", "rmdir", "mkdir", "mkfifo", "mknod", "chmod", "chown", "lchown",
                 "lchmod", "chflags", "lchflags", "truncate", "utime", "setxattr", "removexattr", "chroot"):
        guard_paths(name, (0, "path", "dir_fd"))
    for name in ("fchmod", "fchown"):
        guard_paths(name, (0, "fd", None))
    for name in ("rename", "replace", "link"):
        guard_paths(name, (0, "src", "src_dir_fd"), (1, "dst", "dst_dir_fd"))
    guard_paths("symlink", (1, "dst", "dir_fd"))  # the link must be inside; writes through it are checked on open


def _install_guards(sandbox):
    """Replace the dangerous parts of os/posix/_io/_socket etc. with versions that refuse."""
    _refuse_processes()
    _refuse_network()
    check = _writes_only_inside(sandbox)
    _guard_opens(check)
    _guard_path_calls(check)


def _child_main(status_fd, timeout, max_memory_bytes, max_tasks):
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
    return "".join(traceback.format_exception_only(type(e), e)).strip()[:2000]


def _serve_main(reply_fd, timeout, max_memory_bytes, max_tasks):
    """--serve: load one program, then call its function for each request until stdin closes. stdin carries
    frames of plain data (plain_data.py, bound next to this file): first {"program", "entry_point"},
    then [args, kwargs] per call; each answer is one frame on reply_fd: {"ready": True} once loaded, then
    {"value": v} or {"error": "..."} per call. The parent believes none of it beyond "this is the value"."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import plain_data  # the neighbour file in the runner's folder: the runner never imports nanochat
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


if __name__ == "__main__" and sys.argv[1:2] in (["--child"], ["--serve"]):
    main = _child_main if sys.argv[1] == "--child" else _serve_main
    main(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
