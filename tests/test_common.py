"""nanochat.common: keeping freed memory for reuse (measured in a fresh process, by its page faults)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate and touch 64 MB, free it, then allocate and touch 48 MB; print the page faults of the second one.
SCRIPT = """
import resource, sys, torch
from nanochat.common import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 * 2**20); del x
before = faults()
x = torch.ones(12 * 2**20); del x
print(applied, faults() - before)
"""


def second_round_faults(mode):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    applied, reused = second_round_faults("reuse")
    if applied != "True":
        pytest.skip("not glibc: the setting does not apply")
    _, fresh = second_round_faults("default")
    pages = 48 * 2**20 // 4096
    assert fresh > pages // 2, fresh  # glibc's default: a block this large is new from the OS, page by page
    assert reused < pages // 10, reused  # served from the freed 64 MB: its pages are already there
