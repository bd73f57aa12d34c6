"""CPU sampler for ``bench/tails.py``: every ``--every-ms``, each watched process's CPU
and run-queue wait (``/proc/<pid>/task/<tid>/schedstat``: ns on CPU, ns waiting for
one), summed over its threads, and its main thread apart. Lines ``t role cpu_ns
wait_ns main_cpu_ns main_wait_ns`` (cumulative), to ``--out``; runs until SIGTERM."""

import argparse
import contextlib
import os
import signal
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--every-ms", type=float, default=1.0)
    parser.add_argument("watch", nargs="+", help="role=pid")
    args = parser.parse_args()
    roles = [(w.split("=")[0], int(w.split("=")[1])) for w in args.watch]
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    fds: dict[tuple[str, int, int], int] = {}

    def refresh() -> None:
        for role, pid in roles:
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                if (role, pid, tid) not in fds:
                    with contextlib.suppress(OSError):  # a thread that just ended
                        fds[(role, pid, tid)] = os.open(
                            f"/proc/{pid}/task/{tid}/schedstat", os.O_RDONLY
                        )

    refresh()
    rows = []
    last_refresh = time.monotonic()
    every = args.every_ms / 1000
    while not stop[0]:
        now = time.time()
        sums: dict[str, list[int]] = {role: [0, 0, 0, 0] for role, _ in roles}
        for (role, pid, tid), fd in list(fds.items()):
            try:
                run, wait, _ = os.pread(fd, 64, 0).split()
            except (OSError, ValueError):
                os.close(fd)
                del fds[(role, pid, tid)]
                continue
            s = sums[role]
            s[0] += int(run)
            s[1] += int(wait)
            if tid == pid:
                s[2] += int(run)
                s[3] += int(wait)
        rows.append((now, sums))
        if time.monotonic() - last_refresh > 0.2:
            refresh()
            last_refresh = time.monotonic()
        time.sleep(every)
    with open(args.out, "w") as out:
        for now, sums in rows:
            for role, s in sums.items():
                out.write(f"{now:.6f} {role} {s[0]} {s[1]} {s[2]} {s[3]}\n")


if __name__ == "__main__":
    main()
