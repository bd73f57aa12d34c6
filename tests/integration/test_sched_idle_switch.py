"""``cpu_priority.set_idle`` on this machine's kernel, in a process of its own (it changes
every thread's policy): every thread switches, a thread started later inherits the
policy, and the way back works exactly when ``may_leave_idle`` says it does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from loom_infra.cpu_priority import may_leave_idle

SCRIPT = r"""
import json, os, threading
from loom_infra import cpu_priority

def policies():
    return sorted({os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")})

parked = threading.Event()
threading.Thread(target=parked.wait, daemon=True).start()
said = {"before": policies()}
cpu_priority.set_idle(True)
said["idle"] = policies()
said["is_idle"] = cpu_priority.is_idle()
born = []
later = threading.Thread(target=lambda: born.append(os.sched_getscheduler(0)))
later.start()
later.join(10)
said["born_idle"] = born[0]
try:
    cpu_priority.set_idle(False)
    said["back"] = policies()
except PermissionError:
    said["back"] = "refused"
print(json.dumps(said))
"""


def test_every_thread_switches_and_back_when_allowed() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30, check=True
    )
    said = json.loads(out.stdout)
    assert said["before"] == [os.SCHED_OTHER]
    assert said["idle"] == [os.SCHED_IDLE] and said["is_idle"]
    assert said["born_idle"] == os.SCHED_IDLE  # a thread inherits its starter's policy
    if may_leave_idle(os.nice(0)):
        assert said["back"] == [os.SCHED_OTHER]
    else:
        assert said["back"] == "refused"
