"""
The kernel-level boundary around untrusted code: starts one program in fresh namespaces under bubblewrap,
as an unprivileged host user, with its memory and task count capped, and decides whether unisolated
execution is allowed; it knows nothing about what runs inside.

What a sandboxed program gets (`start`):
  * fresh user, pid, network, mount, ipc, uts and cgroup namespaces: no network at all (only a down
    loopback), no view of other processes (/proc is the sandbox's own);
  * an unprivileged host uid, whoever calls: inside it is uid/gid 65534, outside the caller's own uid or,
    when the caller is root, HOST_UID (65534), with no supplementary groups and no capabilities. As root,
    bubblewrap sets up the mounts as root (it must reach the Python install, often under /root) and
    `setpriv` drops the program to 65534 before the interpreter starts; the id map we write has just
    those two ids (0 -> 0 for the set-up, 65534 -> HOST_UID), and nothing can go back to 0. Root-owned
    host files, /proc/sys included, are therefore out of the program's reach by ordinary permissions;
  * a root made of read-only binds of /usr (and /bin, /lib links), the Python installation and the
    runner files; the project, /etc, /home, /root and the caller's files are simply absent; /proc/sys
    is covered by an empty read-only tmpfs (bubblewrap leaves it writable), /proc/irq and /proc/bus are
    read-only, and every mount is nosuid;
  * one writable place, /tmp (also cwd and HOME), a tmpfs capped at `max_write_bytes` in total;
  * no environment but PATH/HOME/TMPDIR/LANG;
  * a seccomp filter refusing new processes (fork, vfork, clone without CLONE_THREAD), ptrace, mount and
    namespace calls, and the kinds of memory no rlimit counts (memfd_create, memfd_secret, SysV shared
    memory and message queues, POSIX message queues);
  * where the host lets us make cgroups (nanochat/sandbox/cgroup.py), one per run holding everything the program
    holds, within max_memory_bytes + max_write_bytes of memory (anonymous, files in /tmp, pipes, inodes:
    the kernel kills the program past it) and max_tasks tasks (+1 for bubblewrap's reaper);
  * the pid namespace dies with its first process, and that dies with bwrap (--die-with-parent);
    `Sandboxed.close` kills what is left through the cgroup as well.
The runner sets the rlimits inside (nanochat/sandbox/runner.py: RLIMIT_AS, NPROC, NOFILE, ...); with the program
on its own host uid, the kernel counts RLIMIT_NPROC per sandbox, so it holds without a cgroup too.

When bubblewrap is missing or cannot create namespaces here, `isolation()` says why, and callers refuse
to run generated code unless the user opted in with --unsafe-exec or NANOCHAT_UNSAFE_EXEC=1.
"""

import json
import os
import platform
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import PurePosixPath

from nanochat.sandbox import cgroup

SANDBOX_UID = 65534           # "nobody" inside the sandbox
HOST_UID = 65534              # what the program is on the host when the caller is root
RUNNER_DIR = "/opt/nanochat"  # where the runner files are bound read-only
UNSAFE_ENV = "NANOCHAT_UNSAFE_EXEC"
START_TIMEOUT = 10.0          # seconds for bubblewrap to set up before we give up

# -----------------------------------------------------------------------------
# seccomp: a classic-BPF program, as the kernel reads it (struct sock_filter, little-endian hosts)

_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_KILL_PROCESS = 0x80000000
_SECCOMP_RET_ERRNO = 0x00050000
_EPERM, _ENOSYS = 1, 38
_CLONE_THREAD = 0x00010000

# arch -> (AUDIT_ARCH value, syscall numbers). clone3 answers ENOSYS so glibc falls back to clone(),
# whose flags we can inspect (clone3 passes them in memory, out of a filter's reach).
_ARCHES = {
    "x86_64": (0xC000003E, {
        "clone": 56, "clone3": 435, "fork": 57, "vfork": 58, "ptrace": 101, "mount": 165, "umount2": 166,
        "pivot_root": 155, "unshare": 272, "setns": 308, "keyctl": 250, "add_key": 248, "request_key": 249,
        "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "process_vm_writev": 311, "io_uring_setup": 425,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsmount": 432}),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "ptrace": 117, "mount": 40, "umount2": 39, "pivot_root": 41,
        "unshare": 97, "setns": 268, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "process_vm_writev": 271, "io_uring_setup": 425,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsmount": 432}),
}
# Memory that RLIMIT_AS does not count (it is not mapped while it is written) and tmpfs does not cap.
_MEMORY_NR = {
    "x86_64": {"memfd_create": 319, "memfd_secret": 447, "shmget": 29, "msgget": 68, "mq_open": 240},
    "aarch64": {"memfd_create": 279, "memfd_secret": 447, "shmget": 194, "msgget": 186, "mq_open": 180},
}
# Which of those the filter refuses: all of them (a test takes them out to try the cgroup alone).
REFUSED_FOR_MEMORY = tuple(_MEMORY_NR["x86_64"])


def _insn(code, jt, jf, k):
    return struct.pack("<HBBI", code, jt, jf, k)


def seccomp_filter():
    """The BPF bytes of the filter described in the module docstring; None on an architecture we don't know."""
    arch = _ARCHES.get(platform.machine())
    if arch is None or sys.byteorder != "little":
        return None
    audit_arch, nr = arch
    LD_W_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    prog = [
        _insn(LD_W_ABS, 0, 0, 4),                     # A = seccomp_data.arch
        _insn(JEQ, 1, 0, audit_arch),
        _insn(RET, 0, 0, _SECCOMP_RET_KILL_PROCESS),  # another ABI (e.g. 32-bit calls): no
        _insn(LD_W_ABS, 0, 0, 0),                     # A = seccomp_data.nr
    ]
    if audit_arch == 0xC000003E:  # x32 calls carry this bit; they'd bypass the numbers below
        prog += [_insn(JGE, 0, 1, 0x40000000), _insn(RET, 0, 0, _SECCOMP_RET_ERRNO | _EPERM)]
    # clone(flags, ...): threads are fine, new processes are not
    prog += [
        _insn(JEQ, 0, 4, nr["clone"]),
        _insn(LD_W_ABS, 0, 0, 16),                    # A = low 32 bits of args[0] (flags)
        _insn(JSET, 0, 1, _CLONE_THREAD),
        _insn(RET, 0, 0, _SECCOMP_RET_ALLOW),
        _insn(RET, 0, 0, _SECCOMP_RET_ERRNO | _EPERM),
        _insn(JEQ, 0, 1, nr["clone3"]),
        _insn(RET, 0, 0, _SECCOMP_RET_ERRNO | _ENOSYS),
    ]
    memory = _MEMORY_NR[platform.machine()]
    refused = [n for name, n in nr.items() if name not in ("clone", "clone3")]
    refused += [memory[name] for name in REFUSED_FOR_MEMORY]
    for number in refused:
        prog += [_insn(JEQ, 0, 1, number), _insn(RET, 0, 0, _SECCOMP_RET_ERRNO | _EPERM)]
    prog.append(_insn(RET, 0, 0, _SECCOMP_RET_ALLOW))
    return b"".join(prog)


def seccomp_fd():
    """A readable fd holding the filter (for bwrap --seccomp; bwrap reads it once), or None."""
    prog = seccomp_filter()
    if prog is None:
        return None
    fd = os.memfd_create("nanochat-seccomp", 0)
    os.write(fd, prog)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# -----------------------------------------------------------------------------
# bubblewrap

def _system_binds():
    """/usr read-only, and /bin, /lib, /lib64, /sbin as the host has them (links on merged-/usr systems)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def python_executable():
    """The real interpreter behind sys.executable (a venv's python is a link to it; -I -S needs no venv)."""
    return os.path.realpath(sys.executable)


def _as_root():
    return os.geteuid() == 0


def _setpriv():
    """setpriv (util-linux), where the sandbox can run it: under /usr, /bin or /sbin, which are bound."""
    path = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    return os.path.realpath(path) if path else None


def bwrap_command(argv, files, max_write_bytes, seccomp_fd, info_fd, block_fd):
    """The bubblewrap command line that runs `argv` (an interpreter command line) with `files` ({path inside:
    host path}) bound read-only. bwrap writes its child's pid to `info_fd` and waits for a byte on
    `block_fd` (as root: before the uid map exists, which we write; else: before the program starts)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise FileNotFoundError("bwrap (Debian package bubblewrap) is not installed")
    args = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--info-fd", str(info_fd),
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8"]
    if _as_root():
        # Set-up as root in the new namespace (uid 0 -> host 0, see _write_id_maps), then setpriv drops the
        # program to 65534 (-> HOST_UID): leaving uid 0 clears every capability, and nothing maps back.
        args += ["--userns-block-fd", str(block_fd),
                 "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
        argv = [_setpriv(), "--reuid", str(SANDBOX_UID), "--regid", str(SANDBOX_UID), "--clear-groups",
                "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"] + list(argv)
    else:  # bwrap maps 65534 to our own uid, and can forbid new user namespaces for us
        args += ["--disable-userns", "--block-fd", str(block_fd), "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    args += _system_binds()
    binds = {}
    prefix = os.path.realpath(sys.base_prefix)
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        binds[prefix] = prefix
    exe_dir = os.path.dirname(python_executable())
    if not (exe_dir.startswith(prefix + os.sep) or exe_dir.startswith("/usr/") or exe_dir == "/bin"):
        binds[exe_dir] = exe_dir
    binds.update({inside: os.path.realpath(host) for inside, host in files.items()})
    for inside, host in binds.items():
        # bwrap 0.8 makes a bind's missing parents 0700, owned by whoever sets up (root, as root): make
        # them 0755 first, or the program could not reach /root/.pyenv/... or /opt/nanochat as uid 65534
        for d in reversed(PurePosixPath(inside).parents[:-1]):  # top first, "/" left out
            args += ["--dir", str(d)]
        args += ["--ro-bind", host, inside]
    args += ["--proc", "/proc",
             "--size", "4096", "--tmpfs", "/proc/sys", "--remount-ro", "/proc/sys",  # the host's sysctls: absent
             "--dev", "/dev",
             "--perms", "1777", "--size", str(int(max_write_bytes)), "--tmpfs", "/tmp",
             "--remount-ro", "/dev",  # /dev is its own tmpfs: without this it would be an uncapped place to write
             "--remount-ro", "/",
             "--chdir", "/tmp"]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args + ["--"] + list(argv)


def nproc_rlimit(max_tasks):
    """The RLIMIT_NPROC that lets the program have max_tasks tasks: the kernel counts the tasks of the
    program's uid in its user namespace, where bwrap's reaper (pid 1) is one more when we are not root
    (as root it stays uid 0)."""
    return max_tasks if _as_root() else max_tasks + 1


def _read_child_pid(fd, deadline):
    """bwrap's --info-fd JSON (written once, then closed) -> the pid of its child, the sandbox's pid 1."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"bubblewrap did not start within {START_TIMEOUT:g} seconds")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    if not data:
        raise RuntimeError("bubblewrap exited before starting the sandbox")
    return int(json.loads(data)["child-pid"])


def _write_id_maps(pid):
    """As root: the sandbox's uid/gid 0 is host 0 while bubblewrap sets up (it must reach /root, say), and
    SANDBOX_UID is HOST_UID, the only identity the program ever has (setpriv takes it before exec)."""
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 0 1\n{SANDBOX_UID} {HOST_UID} 1\n")


class Sandboxed:
    """A program running in the sandbox. `proc`: its subprocess.Popen (bubblewrap's outer process, in its
    own process group). `close()` kills everything it started and removes its cgroup; after it,
    `oom_killed` says whether the cgroup's memory limit was what stopped it."""

    def __init__(self, proc, run_cgroup):
        self.proc = proc
        self.cgroup = run_cgroup
        self.oom_killed = False
        self._closed = False

    def kill(self):
        if self.proc.poll() is not None:
            return  # reaped: its pid may be someone else's by now (the sandbox's own processes die with it)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self):
        if self._closed:
            return
        self._closed = True
        self.kill()
        self.proc.wait()
        if self.cgroup is not None:
            self.oom_killed = self.cgroup.oom_kills() > 0
            self.cgroup.close()


def start(argv, files, *, max_memory_bytes, max_write_bytes, max_tasks, pass_fds=(), **popen_kwargs):
    """Start `argv` (an interpreter command line: it must live in /usr or the Python install) in the sandbox
    with `files` ({path inside: host path}) bound read-only, and return a Sandboxed once the program is let
    go: by then it is in its cgroup (where there is one) and, when we are root, mapped to HOST_UID.
    popen_kwargs go to subprocess.Popen (stdin, stdout, stderr). Raises OSError, RuntimeError or
    TimeoutError when bubblewrap cannot set up; nothing is left running then."""
    if _as_root() and _setpriv() is None:
        raise FileNotFoundError("running as root, the sandbox needs setpriv (util-linux) "
                                "to drop to an unprivileged uid")
    seccomp = seccomp_fd()
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    run_cgroup = proc = None
    try:
        run_cgroup = cgroup.create(max_memory_bytes + max_write_bytes, max_tasks + 1)  # +1: bwrap's pid 1
        cmd = bwrap_command(argv, files, max_write_bytes, seccomp, info_w, block_r)
        fds = tuple(pass_fds) + (info_w, block_r) + (() if seccomp is None else (seccomp,))
        proc = subprocess.Popen(cmd, pass_fds=fds, env={"PATH": "/usr/bin:/bin"}, cwd="/",
                                start_new_session=True,  # own process group: one killpg ends it
                                **popen_kwargs)
        for fd in (info_w, block_r, seccomp):
            if fd is not None:
                os.close(fd)
        info_w = block_r = seccomp = None
        # bwrap's two processes now wait for our byte: no program runs yet, nothing has forked.
        child = _read_child_pid(info_r, time.monotonic() + START_TIMEOUT)
        if run_cgroup is not None:
            run_cgroup.add(child)
        if _as_root():
            _write_id_maps(child)
        os.write(block_w, b"1")
        return Sandboxed(proc, run_cgroup)
    except BaseException:
        if proc is not None:
            Sandboxed(proc, None).close()
        if run_cgroup is not None:
            run_cgroup.close()
        raise
    finally:
        for fd in (info_r, info_w, block_r, block_w, seccomp):
            if fd is not None:
                os.close(fd)


# -----------------------------------------------------------------------------
# what this host can do, and what callers may do about it

_isolation = None


def isolation():
    """(available, description): whether a sandbox can be made here and which layers it has (or why not),
    probed once per process."""
    global _isolation
    if _isolation is None:
        _isolation = _probe()
    return _isolation


def layers():
    """The boundary's layers on this host, in words (for isolation()'s description and the notes)."""
    who = (f"host uid {HOST_UID} (dropped from root by setpriv)" if _as_root()
           else f"host uid {os.geteuid()} (the caller's)")
    found = ["bubblewrap namespaces", who]
    found.append("seccomp (no new processes, namespaces, memfd or shared memory)" if seccomp_filter() is not None
                 else f"no seccomp filter for {platform.machine()}: new processes bounded by RLIMIT_NPROC only")
    kind, parents = cgroup.where()
    found.append(f"cgroup {kind} per run (memory, pids)" if kind else
                 f"no cgroup ({parents}): memory bounded by RLIMIT_AS, the /tmp cap and seccomp, tasks by RLIMIT_NPROC")
    return found


def _probe():
    if not sys.platform.startswith("linux"):
        return False, "sandboxing needs Linux namespaces (bubblewrap)"
    if shutil.which("bwrap") is None:
        return False, "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap; dev/setup.sh does it)"
    try:
        box = start([python_executable(), "-I", "-S", "-B", "-c", "print('ok')"], {}, max_memory_bytes=256 * 2**20,
                    max_write_bytes=1 << 20, max_tasks=4, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return False, f"bubblewrap cannot create a sandbox here: {e}"
    try:
        out, err = box.proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        out, err = b"", b"timed out"
    finally:
        box.close()
    if box.proc.returncode != 0 or out.strip() != b"ok":
        why = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        return False, f"bubblewrap cannot create a sandbox here ({why})"
    return True, "; ".join(layers())


def unsafe_exec_allowed():
    return os.environ.get(UNSAFE_ENV, "") not in ("", "0")


def allow_unsafe_exec():
    """What --unsafe-exec does: the choice travels to worker processes through the environment."""
    os.environ[UNSAFE_ENV] = "1"


def exec_policy():
    """'isolated', 'unsafe' (no isolation, user opted in) or 'refuse'; with a one-line explanation."""
    ok, reason = isolation()
    if ok:
        return "isolated", f"generated code runs in a sandbox: {reason}"
    if unsafe_exec_allowed():
        return "unsafe", f"WARNING: {reason}; running generated code with Python-level guards only (--unsafe-exec)"
    return "refuse", (f"{reason}; generated code will not be run. Install bubblewrap, or pass --unsafe-exec "
                      f"(or set {UNSAFE_ENV}=1) to run it with Python-level guards only")
