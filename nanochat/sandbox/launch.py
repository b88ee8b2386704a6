"""Starting the runner (nanochat/sandbox/runner.py) for one run: inside the kernel boundary when the policy says
'isolated', else (--unsafe-exec) as a plain child process in a throwaway folder; it knows nothing of what the
runner is asked to do (nanochat/execution.py and nanochat/sandbox/function.py speak to it)."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from nanochat.sandbox import boundary
from nanochat.sandbox.runner import MAX_THREADS, MAX_WRITE_BYTES

HERE = os.path.dirname(os.path.abspath(__file__))


class _Unsandboxed:
    """--unsafe-exec without a sandbox: the runner as a plain child process in a temp dir that is deleted
    afterwards (the Python guards and rlimits only). Same interface as nanochat.sandbox.boundary.Sandboxed."""
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
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self):
        if self.workdir is None:
            return  # closed already: the group's pid may be someone else's by now
        self.kill()  # the whole group: anything the code started is in it
        self.proc.wait()
        _rmtree_force(self.workdir)
        self.workdir = None


def start_runner(policy, mode, args, *, max_memory_bytes, max_write_bytes=MAX_WRITE_BYTES, pass_fds=(), **popen_kwargs):
    """Start the runner: `mode` is '--child' (run code) or '--serve' (serve one function),
    `args` its arguments before the task limit. Sandboxed when `policy` (sandbox.exec_policy) is
    'isolated', else ('unsafe') unsandboxed. -> an object with .proc (Popen), .kill(), .close() (kills
    everything and cleans up) and, after close, .oom_killed. popen_kwargs: stdin, stdout, stderr."""
    if policy != "isolated":
        return _Unsandboxed([os.path.join(HERE, "runner.py"), mode] + args + ["0"], pass_fds, popen_kwargs)
    runner = boundary.RUNNER_DIR + "/runner.py"
    files = {runner: os.path.join(HERE, "runner.py"),
             boundary.RUNNER_DIR + "/plain_data.py": os.path.join(HERE, "plain_data.py")}
    argv = ([boundary.python_executable(), "-I", "-S", "-B", runner, mode] + args
            + [str(boundary.nproc_rlimit(MAX_THREADS))])
    return boundary.start(argv, files, max_memory_bytes=max_memory_bytes, max_write_bytes=max_write_bytes,
                          max_tasks=MAX_THREADS, pass_fds=pass_fds, **popen_kwargs)


def _rmtree_force(path):
    def onerror(func, p, exc_info):  # the code may have chmod-ed things inside; make them deletable and retry
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)
