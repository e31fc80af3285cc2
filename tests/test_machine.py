"""lora_tools/machine.py on a Linux CPU: freed host memory is kept for reuse within a phase, handed
back to the OS between phases, and each phase's peak is read on its own."""
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="glibc's allocator and /proc/self: Linux")

HEAD = textwrap.dedent("""
    import json, torch
    import diffusers.training_utils  # as in the scripts: imported before the run starts
    from lora_tools.machine import free_memory, host_memory_peak, keep_host_memory

    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20  # GB
""")


def measure(body):
    """Run HEAD + body in a fresh process (the allocator's policy is per process); its last line's JSON."""
    r = subprocess.run([sys.executable, "-c", HEAD + textwrap.dedent(body)], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_freed_memory_is_kept_within_a_phase_and_handed_back_between_phases():
    m = measure("""
        keep_host_memory()
        host_memory_peak()
        start = rss()
        blocks = [torch.ones(2**20) for _ in range(200)]  # 200 blocks of 4 MB, touched: 0.78 GB
        del blocks
        kept = rss()  # freed, but kept by the allocator for the next step's reuse
        free_memory()
        handed_back = rss()
        phase_1 = host_memory_peak()
        phase_2 = host_memory_peak()
        big = [torch.ones(16 * 2**20) for _ in range(8)]  # 8 blocks of 64 MB: over glibc's usual 32 MiB
        del big
        usual = rss()  # the usual policy is back: blocks this big went back to the OS when freed
        print(json.dumps(dict(start=start, kept=kept, handed_back=handed_back, usual=usual,
                              phase_1=phase_1 / 2**30, phase_2=phase_2 / 2**30)))
    """)
    blocks_gb = 200 * 4 / 1024
    assert m["kept"] - m["start"] > 0.8 * blocks_gb, m  # keep_host_memory: the freed blocks stay resident
    assert m["kept"] - m["handed_back"] > 0.8 * blocks_gb, m  # free_memory: and go back to the OS
    assert m["phase_1"] - m["start"] > 0.8 * blocks_gb, m  # the first phase's peak saw the blocks
    assert m["phase_2"] < m["handed_back"] + 0.1, m  # the next phase's starts from what is resident now
    assert m["usual"] < m["handed_back"] + 0.1, m  # after free_memory big freed blocks are not kept


def test_the_step_loop_policy_keeps_big_freed_blocks():
    """The negative control of the last line above: under keep_host_memory the same 64 MB blocks stay."""
    m = measure("""
        keep_host_memory()
        start = rss()
        big = [torch.ones(16 * 2**20) for _ in range(8)]
        del big
        print(json.dumps(dict(start=start, kept=rss())))
    """)
    assert m["kept"] - m["start"] > 0.4, m  # 0.5 GB freed, kept for the next step
