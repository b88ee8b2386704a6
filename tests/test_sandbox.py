"""The kernel boundary around generated code (nanochat/sandbox/boundary.py via execute_code): each attack from the
security reviews is replayed with the Python-level guards bypassed (re-importing posix gives back the real
functions), so only the namespaces, mounts, host uid, limits, seccomp filter and cgroup stand in the way.
The second half replays issue 26's attacks as root (what CI runs as), checking from the host that their
effect did not happen, and tries each memory and task limit with the other layers taken away."""

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from nanochat.sandbox import boundary as sandbox
from nanochat.sandbox import cgroup
from nanochat.execution import execute_code
from nanochat.sandbox.runner import MAX_OPEN_FILES, MAX_THREADS

pytestmark = pytest.mark.skipif(not sandbox.isolation()[0],
                                reason=f"no sandbox here: {sandbox.isolation()[1]}")

# The guards patch os/posix in place; a fresh import of the built-in module has the original functions.
RAW = "import sys\ndel sys.modules['posix']\nimport posix\n"


def run(code, **kwargs):
    kwargs.setdefault("timeout", 3.0)
    return execute_code(RAW + code, **kwargs)


def test_raw_posix_really_is_unguarded():
    # Without this the tests below would only test the Python guards again.
    r = run("print(posix.open.__name__, posix.fork.__module__)")
    assert r.completed, r
    assert r.stdout.split() == ["open", "posix"]


def test_runs_as_nobody_with_the_project_invisible():
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = run(f"import os\nprint(os.getuid(), os.getgid())\nprint(os.path.exists({project!r}), os.path.exists('/etc'))\n"
            "print(sorted(k for k in os.environ))")
    assert r.completed, r
    ids, exists, env = r.stdout.splitlines()
    assert ids == "65534 65534"
    assert exists == "False False"
    assert env == "['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR']"


def test_parent_environment_does_not_leak(monkeypatch):
    secret = "hf_" + uuid.uuid4().hex
    monkeypatch.setenv("HF_TOKEN", secret)
    code = ("import os\nout = []\n"
            "for pid in ['self', str(os.getppid()), '1'] + os.listdir('/proc'):\n"
            "    try:\n        out.append(open(f'/proc/{pid}/environ', 'rb').read())\n    except OSError:\n        pass\n"
            "print(b''.join(out))\nprint(os.getppid(), sorted(p for p in os.listdir('/proc') if p.isdigit()))")
    r = run(code)
    assert r.completed, r
    assert secret not in r.stdout and "HF_TOKEN" not in r.stdout
    assert str(os.getpid()) not in r.stdout.splitlines()[-1].split(" ", 1)[1]  # our pid isn't even visible


def test_etc_shadow_is_unreadable():
    r = run("print(open('/etc/shadow').read())")
    assert not r.success and "FileNotFoundError" in r.error
    assert "root:" not in r.stdout


def test_total_bytes_written_is_capped():
    cap = 8 * 2**20
    code = ("import os\ntotal = 0\nchunk = b'x' * 2**20\n"
            "try:\n"
            "    for i in range(1000):\n"
            "        fd = posix.open(f'/tmp/f{i}', posix.O_WRONLY | posix.O_CREAT)\n"
            "        total += posix.write(fd, chunk)\n"
            "        posix.close(fd)\n"
            "except OSError as e:\n    print('stopped:', e.strerror)\n"
            "print(total)")
    r = run(code, max_write_bytes=cap)
    assert r.completed, r
    stopped, total = r.stdout.splitlines()
    assert stopped == "stopped: No space left on device"
    assert int(total) <= cap


def test_system_after_reimporting_posix_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    r = run(f"print(posix.system('echo pwned; touch {marker}'))\n"
            "try:\n    posix.fork()\nexcept OSError as e:\n    print('fork:', e.strerror)")
    assert r.completed, r
    status, fork = r.stdout.splitlines()
    assert "pwned" not in r.stdout and int(status) != 0  # the shell never started
    assert fork == "fork: Operation not permitted"
    assert not marker.exists()


def test_killing_the_parent_and_everyone_else_fails():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        code = ("import os\n"
                "for pid in [os.getppid(), -1] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
                "    try:\n        posix.kill(pid, 9)\n    except OSError:\n        pass\n"
                f"for pid in ({os.getpid()}, {bystander.pid}):\n"
                "    try:\n        posix.kill(pid, 9)\n    except OSError as e:\n        print(e.strerror)\n")
        r = run(code)
        # Inside its pid namespace those pids are not ours (or don't exist); killing the sandbox's own
        # init ends the sandbox, which is fine: what matters is that everyone outside lives.
        assert bystander.poll() is None
        assert psutil.pid_exists(os.getpid())
        assert not r.completed or r.stdout.split() == ["No such process"] * 2, r
    finally:
        bystander.kill()
        bystander.wait()


def test_no_process_outlives_the_call():
    tag = f"{time.time() % 1000:.6f}"  # a unique argument to look for in the process table
    code = ("import os\n"
            "for make in (posix.fork, lambda: posix.posix_spawn('/usr/bin/sleep', ['sleep', '%s'], {}, setsid=True)):\n"
            "    try:\n"
            "        pid = make()\n"
            "        if pid == 0:\n"
            "            posix.setsid()\n"
            "            posix.execv('/usr/bin/sleep', ['sleep', '%s'])\n"
            "        print('started', pid)\n"
            "    except OSError as e:\n"
            "        print('refused:', e.strerror)\n") % (tag, tag)
    r = run(code)
    assert r.completed, r
    assert r.stdout.splitlines() == ["refused: Operation not permitted"] * 2
    time.sleep(0.2)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if tag in (p.info["cmdline"] or [])]
    assert not left


def test_even_a_started_process_dies_with_the_sandbox():
    # Threads are the one kind of task the filter allows; a thread that outlives the code's last line
    # (and would write forever) is killed with the sandbox's pid namespace when the call returns.
    t0 = time.time()
    r = run("import threading, time\n"
            "threading.Thread(target=lambda: time.sleep(60)).start()\nprint('spawned')")
    assert r.completed, r
    assert r.stdout == "spawned\n"
    time.sleep(0.2)
    stray = [p for p in psutil.process_iter(["cmdline", "create_time"])
             if "/opt/nanochat/runner.py" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= t0 - 1]
    # another job on the machine may be running sandboxes of its own: those end within their timeouts,
    # while a runner kept alive by the thread would live for its 60 s sleep
    gone, alive = psutil.wait_procs(stray, timeout=20)
    assert not alive


def test_no_network():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        r = run("del sys.modules['_socket']\nimport _socket\n"
                "for family, addr in ((_socket.AF_INET, ('127.0.0.1', %d)), (_socket.AF_INET, ('1.1.1.1', 53))):\n"
                "    s = _socket.socket(family, _socket.SOCK_STREAM)\n"
                "    s.settimeout(1)\n"
                "    try:\n        s.connect(addr)\n        print('connected')\n"
                "    except OSError as e:\n        print('refused:', e.strerror)\n" % port)
        assert r.completed, r
        assert "connected" not in r.stdout
        # 127.0.0.1 is the sandbox's own loopback, where nobody listens; nothing else is routable
        assert r.stdout.splitlines() == ["refused: Connection refused", "refused: Network is unreachable"]
        with pytest.raises(BlockingIOError):
            server.accept()


def test_refused_without_isolation_unless_opted_in(monkeypatch):
    monkeypatch.setattr(sandbox, "_isolation", (False, "bubblewrap is not installed"))
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "0")  # (recorded, so restored after)
    r = execute_code("print('hi')")
    assert not r.success and r.stdout == ""
    assert r.error.startswith("not run: bubblewrap is not installed") and "--unsafe-exec" in r.error
    sandbox.allow_unsafe_exec()  # what --unsafe-exec does (monkeypatch restores the environment)
    assert os.environ[sandbox.UNSAFE_ENV] == "1"
    r = execute_code("print('hi')")
    assert r.completed and r.stdout == "hi\n"


def test_seccomp_filter_is_well_formed():
    prog = sandbox.seccomp_filter()
    assert len(prog) % 8 == 0 and 8 < len(prog) // 8 < 4096  # whole instructions, within the kernel's limit


def test_only_tmp_is_writable():
    code = ("for d in ['/', '/usr', '/usr/lib', '/dev', '/dev/shm', '/opt/nanochat', '/proc/self', '/tmp']:\n"
            "    try:\n"
            "        posix.close(posix.open(d.rstrip('/') + '/x', posix.O_WRONLY | posix.O_CREAT))\n"
            "        print(d, 'written')\n"
            "    except OSError as e:\n"
            "        print(d, e.strerror)\n")
    r = run(code)
    assert r.completed, r
    lines = r.stdout.splitlines()
    assert lines[-1] == "/tmp written"
    assert all(not line.endswith("written") for line in lines[:-1]), lines


# ----------------------------------------------------------------------------- issue 26: attacks as root
# CI runs as root, where the sandbox used to map the program to host uid 0 (and so could write host
# sysctls) and where RLIMIT_NPROC did not count. Each test replays an attack and checks, from the host
# where it can, that its effect did not happen. SAFETY: sysctls are only ever written with the value
# they already have (read on the host first), and no memory attack goes past ~1 GiB.

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="replays an attack that needs the caller to be root (CI is)")
with_cgroup = pytest.mark.skipif(cgroup.where()[0] is None, reason=f"no per-run cgroup here: {cgroup.where()[1]}")

SYSCTLS = ["kernel/core_pattern", "kernel/panic", "vm/overcommit_memory", "kernel/randomize_va_space"]
CTYPES = "for m in ('ctypes', '_ctypes'):\n    sys.modules.pop(m, None)\nimport ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def host_sysctls():
    values = {}
    for name in SYSCTLS:
        with open(f"/proc/sys/{name}", "rb") as f:
            values[name] = f.read()
    return values


def sysctl_attack(values):
    """Code that tries to write each sysctl back with its current host value by every route it can think
    of, and to open every file under /proc/sys for writing; it reports what worked."""
    return (f"values = {values!r}\n"
            "import os\nwritten = []\n"
            "for name, value in values.items():\n"
            "    for path in ('/proc/sys/', '/proc/self/root/proc/sys/', '/proc/1/root/proc/sys/'):\n"
            "        try:\n"
            "            fd = posix.open(path + name, posix.O_WRONLY)\n"
            "            posix.write(fd, value)\n"
            "            posix.close(fd)\n"
            "            written.append(path + name)\n"
            "        except OSError:\n"
            "            pass\n"
            "for root, dirs, files in os.walk('/proc/sys'):\n"
            "    for f in files:\n"
            "        try:\n"
            "            posix.close(posix.open(os.path.join(root, f), posix.O_WRONLY))\n"  # opening writes nothing
            "            written.append(os.path.join(root, f))\n"
            "        except OSError:\n"
            "            pass\n"
            "print('written:', written)\n")


def run_bare(code, max_memory_bytes, max_tasks, timeout=10.0):
    """`python -c code` in the sandbox with no runner: no rlimits, no Python guards, so only bubblewrap,
    seccomp and the cgroup are in the way. -> (stdout lines, Sandboxed after close)."""
    box = sandbox.start([sandbox.python_executable(), "-I", "-S", "-B", "-u", "-c", code], {},
                        max_memory_bytes=max_memory_bytes, max_write_bytes=1 << 20, max_tasks=max_tasks,
                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, _ = box.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        box.kill()
        out, _ = box.proc.communicate()
    box.close()
    return out.decode().splitlines(), box


def host_view_of_the_runner(call):
    """Run call() in a thread and look at the sandboxed runner it starts from the host, while it runs: ->
    (call's result, [(uids, gids, /proc/<pid>/status text)] of every runner process seen)."""
    import threading
    box, seen = {}, []
    t = threading.Thread(target=lambda: box.update(result=call()))
    t.start()
    while t.is_alive():
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = p.cmdline()  # (bwrap's own processes have the runner's path among their arguments too)
                if cmd and cmd[0].startswith(("/usr/", os.path.realpath(sys.base_prefix))) and "python" in cmd[0] \
                        and sandbox.RUNNER_DIR + "/runner.py" in cmd:
                    seen.append((p.uids(), p.gids(), open(f"/proc/{p.pid}/status").read()))
            except (psutil.Error, OSError):
                pass
        time.sleep(0.05)
    t.join()
    return box["result"], seen


def assert_unprivileged(seen, uid):
    assert seen, "the runner never showed up in the process table"
    for uids, gids, status in seen:
        assert set(uids) == {uid} and set(gids) == {uid}
        fields = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in status.splitlines()}
        assert fields["Groups"] == ""
        for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(fields[cap], 16) == 0, (cap, fields[cap])


@as_root
def test_program_runs_as_an_unprivileged_host_uid_without_capabilities():
    r, seen = host_view_of_the_runner(lambda: run(
        "print(open('/proc/self/uid_map').read())\nimport os, time\nprint(os.getuid(), os.getgid(), os.getgroups())\n"
        "time.sleep(1.0)", timeout=5.0))
    assert r.completed, r
    assert_unprivileged(seen, sandbox.HOST_UID)
    # the map, seen inside: the program's uid is HOST_UID outside (0 -> 0 is bubblewrap's set-up identity)
    maps = [line.split() for line in r.stdout.splitlines()[:-1] if line.strip()]
    inside_to_host = {int(a): int(b) for a, b, _ in maps}
    assert inside_to_host[sandbox.SANDBOX_UID] == sandbox.HOST_UID != 0
    assert r.stdout.splitlines()[-1] == "65534 65534 []"


@as_root
def test_host_sysctls_cannot_be_written():
    before = host_sysctls()
    r = run("import os\nprint(os.listdir('/proc/sys'))\n" + sysctl_attack(before), timeout=10.0)
    assert r.completed, r
    listing, written = r.stdout.splitlines()
    assert listing == "[]"  # covered by an empty read-only tmpfs
    assert written == "written: []"
    assert host_sysctls() == before


@as_root
def test_history_replay_through_the_python_tool_cannot_write_sysctls():
    # The HTTP route of the review: a history message carries a python cell, which the tool replays.
    from nanochat.tools.registry import ToolRegistry
    before = host_sysctls()
    cell = RAW + sysctl_attack(before).replace("print('written:', written)\n", "") + (
        "import threading, time\nthreading.stack_size(1 << 16)\nthreads = 0\n"
        "try:\n    for _ in range(64):\n"
        "        threading.Thread(target=time.sleep, args=(2,), daemon=True).start()\n        threads += 1\n"
        "except RuntimeError:\n    pass\n")
    session = ToolRegistry(calculator=False).session(history=[("python:\n" + cell, "")])
    out = session("python: print(written, threads)")
    assert out == f"[] {MAX_THREADS - 1}", out
    assert host_sysctls() == before


def test_memory_that_no_rlimit_counts_and_new_namespaces_are_refused():
    r = run(CTYPES + "import os\nfor name, call in [('memfd_create', lambda: posix.memfd_create('x')),\n"
            "        ('memfd_secret', lambda: libc.syscall(447, 0)),\n"
            "        ('shmget', lambda: libc.shmget(0, 1 << 20, 0o1600)),\n"
            "        ('msgget', lambda: libc.msgget(0, 0o1600)),\n"
            "        ('mq_open', lambda: libc.mq_open(b'/q', 0o102, 0o600, None)),\n"
            "        ('unshare', lambda: libc.unshare(0x10000000))]:\n"  # a new user namespace
            "    ctypes.set_errno(0)\n"
            "    try:\n        result = call()\n        print(name, result, os.strerror(ctypes.get_errno()))\n"
            "    except OSError as e:\n        print(name, 'raised', e.strerror)\n")
    assert r.completed, r
    assert r.stdout.splitlines() == ["memfd_create raised Operation not permitted"] + [
        f"{name} -1 Operation not permitted" for name in ("memfd_secret", "shmget", "msgget", "mq_open", "unshare")]


MEMFD_FLOOD = ("import os\nfd = os.memfd_create('x')\nchunk = b'x' * (16 << 20)\nheld = 0\n"
               "while held < (1 << 30):\n    held += os.write(fd, chunk)\n    print(held, flush=True)\n")
SHM_FLOOD = (CTYPES + "libc.shmat.restype = ctypes.c_void_p\nheld = 0\n"
             "while held < (1 << 30):\n"
             "    shm = libc.shmget(0, 64 << 20, 0o1600)\n"
             "    if shm < 0:\n        print('refused', ctypes.get_errno())\n        break\n"
             "    addr = libc.shmat(shm, None, 0)\n    ctypes.memset(addr, 1, 64 << 20)\n"
             "    libc.shmdt(ctypes.c_void_p(addr))\n    held += 64 << 20\n    print(held, flush=True)\n")
ANON_FLOOD = "held, keep = 0, []\nwhile held < (1 << 30):\n    keep.append(bytearray(16 << 20))\n    held += 16 << 20\n    print(held, flush=True)\n"
FILES_FLOOD = ("import os, time\nn = 0\nt0 = time.time()\nwhile time.time() - t0 < 8:\n"
               "    for _ in range(1000):\n        os.close(os.open(f'/tmp/{n}', os.O_CREAT | os.O_WRONLY))\n        n += 1\n"
               "    print(n * 512, flush=True)\n")  # an empty file costs the kernel more than 512 bytes (inode + dentry)


@with_cgroup
@pytest.mark.parametrize("attack", [MEMFD_FLOOD, SHM_FLOOD, ANON_FLOOD, FILES_FLOOD], ids=["memfd", "shm", "anonymous", "inodes"])
def test_the_cgroup_alone_bounds_all_memory(monkeypatch, attack):
    # No runner (so no RLIMIT_AS) and the seccomp filter without its memory rules: the cgroup has to stop
    # each kind of memory on its own, at max_memory_bytes + max_write_bytes.
    monkeypatch.setattr(sandbox, "REFUSED_FOR_MEMORY", ())
    limit = 64 << 20
    lines, box = run_bare("import sys\n" + attack, max_memory_bytes=limit - (1 << 20), max_tasks=4)
    assert box.oom_killed, lines[-3:]
    held = int(lines[-1]) if lines else 0
    assert held <= limit, f"{held >> 20} MiB held past the {limit >> 20} MiB limit"


@with_cgroup
def test_execute_code_reports_the_cgroup_stopping_a_memfd_flood(monkeypatch):
    monkeypatch.setattr(sandbox, "REFUSED_FOR_MEMORY", ())
    r = run(MEMFD_FLOOD, max_memory_bytes=64 << 20, max_write_bytes=8 << 20, timeout=10.0)
    assert r.memory_exceeded and not r.success and not r.timed_out, r
    assert "memory limit" in r.error
    assert int(r.stdout.split()[-1]) <= 72 << 20


def test_pipes_hold_little_memory():
    # Pipe buffers count in no rlimit of their own; the open-file limit caps how many there are.
    r = run("import fcntl, os\nheld, pipes = 0, []\n"
            "try:\n    while True:\n        pipes.append(os.pipe())\nexcept OSError as e:\n    print(len(pipes), e.strerror)\n"
            "for r, w in pipes:\n    os.set_blocking(w, False)\n"
            "    try:\n        fcntl.fcntl(w, 1031, 1 << 20)\n    except OSError:\n        pass\n"
            "    try:\n        while True:\n            held += os.write(w, b'x' * 65536)\n"
            "    except BlockingIOError:\n        pass\n"
            "print(held)\n", timeout=10.0)
    assert r.completed, r
    count, total = r.stdout.splitlines()
    assert count.endswith("Too many open files") and int(count.split()[0]) <= MAX_OPEN_FILES // 2
    assert int(total) <= (MAX_OPEN_FILES // 2) * (1 << 20)


THREAD_FLOOD = ("import threading, time\nthreading.stack_size(1 << 16)\nn = 0\n"  # small stacks: RLIMIT_AS is not what stops it
                "try:\n    for _ in range(1000):\n"
                "        threading.Thread(target=time.sleep, args=(3,), daemon=True).start()\n        n += 1\n"
                "except RuntimeError as e:\n    print('refused:', e)\nprint(n)\n")


def test_threads_beyond_the_limit_fail_to_start():
    r = run(THREAD_FLOOD, timeout=10.0)
    assert r.completed, r
    assert r.stdout.splitlines() == ["refused: can't start new thread", str(MAX_THREADS - 1)]


def test_threads_are_bounded_without_a_cgroup(monkeypatch):
    # RLIMIT_NPROC alone: it holds because the program has a host uid of its own.
    monkeypatch.setattr(cgroup, "create", lambda *a: None)
    r = run(THREAD_FLOOD, timeout=10.0)
    assert r.completed, r
    assert r.stdout.splitlines()[-1] == str(MAX_THREADS - 1)


@with_cgroup
def test_threads_are_bounded_by_the_cgroup_alone():
    lines, box = run_bare(THREAD_FLOOD, max_memory_bytes=128 << 20, max_tasks=8)
    assert lines == ["refused: can't start new thread", "7"]  # the main thread is the eighth task


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3") or not shutil.which("setpriv"),
                    reason="needs root (to become another user), the system python3 and setpriv")
def test_an_unprivileged_caller_gets_its_own_uid_and_the_same_limits():
    # The other path through nanochat.sandbox: a caller that is not root (here: uid 65534, with the
    # system Python, which that user can read). bwrap maps the program to the caller's uid.
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    attack = RAW + "print(open('/proc/self/uid_map').read().split())\n" + THREAD_FLOOD + "time.sleep(0.5)\n"
    script = (f"import sys\nsys.path.insert(0, {project!r})\nfrom nanochat.sandbox import boundary as sandbox\n"
              f"from nanochat.execution import execute_code\nprint(sandbox.isolation())\n"
              f"r = execute_code({attack!r}, timeout=10)\nprint(r.stdout, r.error)\n")
    p, seen = host_view_of_the_runner(lambda: subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-I", "-c", script],
        capture_output=True, text=True, timeout=120, cwd="/"))
    assert p.returncode == 0, p.stderr
    isolation, uid_map, refused, count, _ = p.stdout.split("\n", 4)
    assert isolation.startswith("(True,") and "host uid 65534 (the caller's)" in isolation, isolation
    assert uid_map == "['65534', '0', '1']"  # 0 of bwrap's outer namespace, which is the caller's uid
    assert_unprivileged(seen, 65534)
    assert count.strip() == str(MAX_THREADS - 1)
