"""The kernel boundary around generated code (nanochat/sandbox.py via execute_code): each attack from the
security review is replayed with the Python-level guards bypassed (re-importing posix gives back the real
functions), so only the namespaces, mounts, limits and seccomp filter stand in the way."""

import os
import socket
import subprocess
import time
import uuid

import psutil
import pytest

from nanochat import sandbox
from nanochat.execution import execute_code

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
