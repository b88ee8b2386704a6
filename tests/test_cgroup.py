"""Per-run cgroups (nanochat/sandbox/cgroup.py): where they can go on v1, v2 and container hosts (from the text of
/proc/self/cgroup and mountinfo, over folders made by the test), and one run's life on this host."""

import os
import subprocess
import time

import pytest

from nanochat.sandbox import cgroup

V1_CGROUP = "12:pids:/\n4:memory:/jobs/42\n1:name=systemd:/\n0::/\n"
V2_CGROUP = "0::/user.slice/app.scope\n"


def mountinfo(*mounts):
    """mountinfo lines for (mount point, root, fstype, super options)."""
    return "".join(f"{30 + i} 1 0:{40 + i} {root} {point} rw,nosuid - {fstype} {fstype} {opts}\n"
                   for i, (point, root, fstype, opts) in enumerate(mounts))


def test_parsing():
    assert cgroup.own_cgroups(V1_CGROUP) == {"pids": "/", "memory": "/jobs/42", "name=systemd": "/", "": "/"}
    mounts = cgroup.cgroup_mounts(mountinfo(("/sys/fs/cgroup/memory", "/", "cgroup", "rw,memory"),
                                            ("/sys/fs/cgroup/unified", "/", "cgroup2", "rw"),
                                            ("/", "/", "ext4", "rw")))
    assert mounts == {"rw": ("/sys/fs/cgroup/memory", "/"), "memory": ("/sys/fs/cgroup/memory", "/"),
                      "": ("/sys/fs/cgroup/unified", "/")}


def test_v1_is_found_where_both_controllers_are_writable(tmp_path):
    (tmp_path / "memory" / "jobs" / "42").mkdir(parents=True)
    (tmp_path / "pids").mkdir()
    info = mountinfo((str(tmp_path / "memory"), "/", "cgroup", "rw,memory"), (str(tmp_path / "pids"), "/", "cgroup", "rw,pids"))
    assert cgroup.find_parents(V1_CGROUP, info) == ("v1", {"memory": str(tmp_path / "memory" / "jobs" / "42"),
                                                           "pids": str(tmp_path / "pids")})
    kind, why = cgroup.find_parents(V1_CGROUP.replace("/jobs/42", "/jobs/43"), info)
    assert kind is None and "no write access" in why and "jobs/43" in why


def test_v2_needs_both_controllers_and_a_subtree_it_may_enable(tmp_path):
    own = tmp_path / "user.slice" / "app.scope"
    own.mkdir(parents=True)
    info = mountinfo((str(tmp_path), "/", "cgroup2", "rw"))
    (own / "cgroup.controllers").write_text("cpu io memory\n")
    kind, why = cgroup.find_parents(V2_CGROUP, info)
    assert kind is None and "no memory and pids" in why and "cpu io memory" in why
    (own / "cgroup.controllers").write_text("cpu io memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    assert cgroup.find_parents(V2_CGROUP, info) == ("v2", {"memory": str(own), "pids": str(own)})
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"
    (own / "cgroup.subtree_control").unlink()
    (own / "cgroup.subtree_control").mkdir()  # a write that fails even for root (as EBUSY does in a cgroup with processes)
    kind, why = cgroup.find_parents(V2_CGROUP, info)
    assert kind is None and "cannot enable memory and pids" in why and "delegated" in why


def test_a_container_sees_its_own_subtree(tmp_path):
    # Without a cgroup namespace, a container's mount shows the hierarchy from /docker/<id> on.
    (tmp_path / "memory").mkdir()
    (tmp_path / "pids").mkdir()
    info = mountinfo((str(tmp_path / "memory"), "/docker/abc", "cgroup", "rw,memory"),
                     (str(tmp_path / "pids"), "/docker/abc", "cgroup", "rw,pids"))
    assert cgroup.find_parents("5:memory:/docker/abc\n6:pids:/docker/abc\n", info) == (
        "v1", {"memory": str(tmp_path / "memory"), "pids": str(tmp_path / "pids")})
    kind, why = cgroup.find_parents("5:memory:/other\n6:pids:/other\n", info)
    assert kind is None and "not visible" in why


def test_nothing_mounted():
    assert cgroup.find_parents(V2_CGROUP, mountinfo(("/", "/", "ext4", "rw"))) == (
        None, "no cgroup memory and pids controllers are mounted")


@pytest.mark.skipif(cgroup.where()[0] is None, reason=f"no per-run cgroup here: {cgroup.where()[1]}")
def test_a_run_cgroup_holds_limits_and_is_removed_with_what_it_held():
    run = cgroup.create(64 << 20, 5)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        run.add(sleeper.pid)
        memory_limit = "memory.limit_in_bytes" if run.kind == "v1" else "memory.max"
        with open(os.path.join(run.memory_dir, memory_limit)) as f:
            assert int(f.read()) == 64 << 20
        with open(os.path.join(run.pids_dir, "pids.max")) as f:
            assert f.read().strip() == "5"
        with open(f"/proc/{sleeper.pid}/cgroup") as f:
            assert os.path.basename(run.memory_dir) in f.read()
        assert run.oom_kills() == 0
        t0 = time.time()
        run.close()
        assert sleeper.wait(timeout=5) == -9 and time.time() - t0 < 5  # killed with its cgroup
        assert not any(os.path.exists(d) for d in run.dirs)
    finally:
        sleeper.kill()
        sleeper.wait()
