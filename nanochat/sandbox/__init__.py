"""The sandbox for untrusted code (model-written tool calls, HumanEval replies): the kernel boundary, the
program that runs inside it, and the plain data that crosses it; nanochat/execution.py is what callers use,
and nothing here knows of models or tasks.

    boundary.py    bubblewrap namespaces, an unprivileged host uid, seccomp, /proc/sys hidden; the policy
                   (isolated, --unsafe-exec, or refuse) and `start`
    cgroup.py      a cgroup per run capping all the memory and tasks a program holds, where the host allows
    runner.py      the program that starts inside: its own rlimits and Python-level guards, then the code
                   (--child) or one function served call by call (--serve); stdlib only
    launch.py      starting the runner for one run, sandboxed or (--unsafe-exec) as a plain child
    plain_data.py  values without behaviour to bytes and back, and the frames they travel in
    function.py    SandboxedFunction: call one function of an untrusted program from trusted code
"""
