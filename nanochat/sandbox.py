"""
The kernel-level boundary around untrusted code: builds the bubblewrap command that runs one program in
fresh namespaces, and decides whether unisolated execution is allowed; it knows nothing about what runs inside.

What a sandboxed program gets (see `bwrap_command`):
  * fresh user, pid, network, mount, ipc, uts and cgroup namespaces: no network at all (only a down
    loopback), no view of other processes (/proc is the sandbox's own), no way to create more
    user namespaces;
  * a root made of read-only binds of /usr (and /bin, /lib links), the Python installation and the
    runner script; the project, /etc, /home, /root and the caller's files are simply absent;
  * one writable place, /tmp (also cwd and HOME), a tmpfs capped at `max_write_bytes` in total;
  * uid/gid 65534 inside, no capabilities, no environment but PATH/HOME/TMPDIR/LANG;
  * a seccomp filter refusing new processes (fork, vfork, clone without CLONE_THREAD), ptrace, mount
    and namespace calls, so the process count is bounded no matter which uid the sandbox maps to
    outside (the kernel does not apply RLIMIT_NPROC to a sandbox that maps to root outside);
  * the pid namespace dies with its first process, and that dies with bwrap (--die-with-parent), so
    killing bwrap's process group ends everything the program started, setsid()-ed children included.

When bubblewrap is missing or cannot create namespaces here, `isolation()` says why, and callers refuse
to run generated code unless the user opted in with --unsafe-exec or NANOCHAT_UNSAFE_EXEC=1.
"""

import os
import platform
import shutil
import struct
import subprocess
import sys

SANDBOX_UID = 65534           # "nobody" inside the sandbox
RUNNER_PATH = "/opt/nanochat/runner.py"
UNSAFE_ENV = "NANOCHAT_UNSAFE_EXEC"

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
    for name, number in nr.items():
        if name not in ("clone", "clone3"):
            prog += [_insn(JEQ, 0, 1, number), _insn(RET, 0, 0, _SECCOMP_RET_ERRNO | _EPERM)]
    prog.append(_insn(RET, 0, 0, _SECCOMP_RET_ALLOW))
    return b"".join(prog)


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


def bwrap_command(argv, runner, max_write_bytes, seccomp_fd=None):
    """The command that runs `argv` (an interpreter command line) inside the sandbox, with the file
    `runner` visible read-only at RUNNER_PATH."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise FileNotFoundError("bwrap (Debian package bubblewrap) is not installed")
    prefix = os.path.realpath(sys.base_prefix)
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8"]
    args += _system_binds()
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        args += ["--ro-bind", prefix, prefix]
    exe_dir = os.path.dirname(python_executable())
    if not (exe_dir.startswith(prefix + os.sep) or exe_dir.startswith("/usr/") or exe_dir == "/bin"):
        args += ["--ro-bind", exe_dir, exe_dir]
    args += ["--ro-bind", os.path.realpath(runner), RUNNER_PATH,
             "--proc", "/proc", "--dev", "/dev",
             "--size", str(int(max_write_bytes)), "--tmpfs", "/tmp",
             "--remount-ro", "/dev",  # /dev is its own tmpfs: without this it would be an uncapped place to write
             "--remount-ro", "/",
             "--chdir", "/tmp"]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args + ["--"] + list(argv)


def seccomp_fd():
    """A readable fd holding the filter (for bwrap --seccomp; bwrap reads it once), or None."""
    prog = seccomp_filter()
    if prog is None:
        return None
    fd = os.memfd_create("nanochat-seccomp", 0)
    os.write(fd, prog)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


_isolation = None


def isolation():
    """(available, reason): whether bwrap can run a program here, probed once per process."""
    global _isolation
    if _isolation is None:
        _isolation = _probe()
    return _isolation


def _probe():
    if not sys.platform.startswith("linux"):
        return False, "sandboxing needs Linux namespaces (bubblewrap)"
    if shutil.which("bwrap") is None:
        return False, "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap; dev/setup.sh does it)"
    fd = None
    try:
        fd = seccomp_fd()
        cmd = bwrap_command([python_executable(), "-I", "-S", "-B", "-c", "print('ok')"], __file__,
                            1 << 20, seccomp_fd=fd)
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                           pass_fds=() if fd is None else (fd,))
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"bubblewrap failed to start: {e}"
    finally:
        if fd is not None:
            os.close(fd)
    if p.returncode != 0 or p.stdout.strip() != b"ok":
        why = (p.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        return False, f"bubblewrap cannot create a sandbox here ({why})"
    if seccomp_filter() is None:
        return True, f"namespaces only: no seccomp filter for {platform.machine()}, process count relies on RLIMIT_NPROC"
    return True, "bubblewrap namespaces + seccomp"


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
