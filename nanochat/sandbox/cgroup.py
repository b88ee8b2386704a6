"""Per-run cgroups that cap what one sandboxed program may hold: all of its memory, as the kernel charges it
(anonymous memory, the pages of its files in tmpfs and memfds, shared memory, kernel objects such as inodes
and pipe buffers), and its task count. It finds where this process may create child cgroups (the cgroup v1
`memory` and `pids` hierarchies, or a cgroup v2 directory with both controllers), makes one per run, moves
a process in, tells whether the kernel killed for memory, and removes it again; it knows nothing of
bubblewrap or of what runs inside.

Where: under this process's own cgroup (read from /proc/self/cgroup), as `nanochat-sbx-<our pid>-<n>`.
On v1 that needs write access to our memory and pids cgroups (root has it). On v2 our cgroup must be
allowed children with memory and pids (enabling them in its cgroup.subtree_control succeeds only where no
process sits in it, or at the root): a server that should get this layer runs in a delegated cgroup of its
own, with its process in a leaf below. Anywhere else `where()` says why not, and callers rely on their
other limits.
"""

import itertools
import os
import signal
import time

PREFIX = "nanochat-sbx"
_counter = itertools.count()
_where = None


def own_cgroups(proc_self_cgroup):
    """Text of /proc/self/cgroup -> {controller: path}; the v2 entry is under the key ''."""
    own = {}
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in controllers.split(",") if controllers else [""]:
            own[c] = path
    return own


def cgroup_mounts(mountinfo):
    """Text of /proc/self/mountinfo -> {controller: (mount point, root of the mount)} for v1 hierarchies,
    '' for the v2 one."""
    mounts = {}
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fields, rest = before.split(), after.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        root, point = fields[3], fields[4].replace("\\040", " ")
        fstype, options = rest[0], rest[2]
        if fstype == "cgroup2":
            mounts.setdefault("", (point, root))
        elif fstype == "cgroup":
            for c in options.split(","):
                mounts.setdefault(c, (point, root))
    return mounts


def _dir(mount, path):
    """The directory of cgroup `path` under a mount that shows the hierarchy from `root` on (a container's
    bind of its own subtree has root /docker/<id>, say), or None when the path is not below that root."""
    point, root = mount
    rel = os.path.relpath(path, root)
    return None if rel.startswith("..") else os.path.normpath(os.path.join(point, rel))


def find_parents(proc_self_cgroup, mountinfo):
    """Where per-run cgroups can go: (kind 'v1' | 'v2', {'memory': dir, 'pids': dir}), or (None, why not)."""
    own, mounts = own_cgroups(proc_self_cgroup), cgroup_mounts(mountinfo)
    if "memory" in mounts and "pids" in mounts and "memory" in own and "pids" in own:
        dirs = {c: _dir(mounts[c], own[c]) for c in ("memory", "pids")}
        for c, d in dirs.items():
            if d is None:
                return None, f"cgroup v1: our {c} cgroup {own[c]} is not visible under {mounts[c][0]}"
            if not os.access(d, os.W_OK):
                return None, f"cgroup v1: no write access to {d}"
        return "v1", dirs
    if "" in mounts and "" in own:
        d = _dir(mounts[""], own[""])
        if d is None:
            return None, f"cgroup v2: our cgroup {own['']} is not visible under {mounts[''][0]}"
        try:
            with open(os.path.join(d, "cgroup.controllers")) as f:
                available = f.read().split()
        except OSError as e:
            return None, f"cgroup v2: cannot read {d}: {e.strerror}"
        if not {"memory", "pids"} <= set(available):
            return None, (f"cgroup v2: {d} has no memory and pids controllers to give "
                          f"(it has: {' '.join(available) or 'none'})")
        try:
            with open(os.path.join(d, "cgroup.subtree_control"), "w") as f:
                f.write("+memory +pids")
        except OSError as e:
            return None, (f"cgroup v2: cannot enable memory and pids below {d} ({e.strerror}); run the server in "
                          "a delegated cgroup whose processes sit in a leaf below it")
        return "v2", {"memory": d, "pids": d}
    return None, "no cgroup memory and pids controllers are mounted"


def where():
    """(kind, parents) or (None, reason), found once per process; leftovers of dead processes are removed."""
    global _where
    if _where is None:
        try:
            with open("/proc/self/cgroup") as f, open("/proc/self/mountinfo") as g:
                _where = find_parents(f.read(), g.read())
        except OSError as e:
            _where = (None, f"cannot read this process's cgroups: {e.strerror}")
        if _where[0] is not None:
            _remove_leftovers(_where[1])
    return _where


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_leftovers(parents):
    """Run cgroups of processes that died before removing them (a crash, kill -9)."""
    for parent in set(parents.values()):
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            pid = name[len(PREFIX) + 1:].split("-")[0]
            if name.startswith(PREFIX + "-") and pid.isdigit() and not _alive(int(pid)):
                _remove_dirs([os.path.join(parent, name)])


def _pids(d):
    try:
        with open(os.path.join(d, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def _remove_dirs(dirs):
    """Kill every process in each cgroup, then remove it (rmdir answers EBUSY until they have exited)."""
    deadline = time.monotonic() + 5.0
    for d in dirs:
        while True:
            for pid in _pids(d):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break  # left for a later process's leftover sweep
                time.sleep(0.001)


class RunCgroup:
    """One run's cgroup: `memory_bytes` of memory (no swap) and `max_tasks` tasks (processes + threads)
    for everything moved into it and everything those start."""

    def __init__(self, kind, parents, memory_bytes, max_tasks):
        self.kind = kind
        name = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        self.memory_dir = os.path.join(parents["memory"], name)
        self.pids_dir = os.path.join(parents["pids"], name)
        self.dirs = sorted({self.memory_dir, self.pids_dir})
        made = []
        try:
            for d in self.dirs:
                os.mkdir(d)
                made.append(d)
            # no swap: v1 caps memory + swap at the memory limit, v2 caps swap at 0
            limit, swap, swap_limit = (("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", memory_bytes)
                                       if kind == "v1" else ("memory.max", "memory.swap.max", 0))
            _write(os.path.join(self.memory_dir, limit), memory_bytes)
            swap = os.path.join(self.memory_dir, swap)
            if os.path.exists(swap):  # only with swap accounting
                _write(swap, swap_limit)
            _write(os.path.join(self.pids_dir, "pids.max"), max_tasks)
        except OSError:
            _remove_dirs(made)
            raise

    def add(self, pid):
        """Move process `pid` (all its threads) in; what it starts later is born inside."""
        for d in self.dirs:
            _write(os.path.join(d, "cgroup.procs"), pid)

    def oom_kills(self):
        """How many times the kernel killed inside for going over the memory limit."""
        name = "memory.oom_control" if self.kind == "v1" else "memory.events"
        try:
            with open(os.path.join(self.memory_dir, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def close(self):
        """Kill whatever is still inside and remove the cgroup."""
        _remove_dirs(self.dirs)

def create(memory_bytes, max_tasks):
    """A RunCgroup where this host allows one, else None (where() says why)."""
    kind, parents = where()
    if kind is None:
        return None
    return RunCgroup(kind, parents, memory_bytes, max_tasks)
