"""CPU speed probe: how long a fixed piece of pure-Python work takes, every ~30 ms.

Run pinned to the server's CPU by bench/run.py.  It prints ``<CLOCK_MONOTONIC> <cpu seconds>``
per sample.  On this shared VM the same work takes from 1x to 2x its fastest CPU time from
one moment to the next (the host takes the CPU away while the guest counts it as used), so
the bench divides server CPU figures by how slow the probe was during the same interval.
Duty cycle ~5%: it takes a little CPU from the server, like any other process would.
"""

import sys
import time


def work(n: int = 12000) -> int:
    s = 0
    d = {}
    for i in range(n):
        s += i * i % 7
        if i % 16 == 0:
            d[str(i)] = s
    return s + len(d)


def main() -> int:
    interval = float(sys.argv[1]) if len(sys.argv) > 1 else 0.03
    out = sys.stdout
    clock, cpu, sleep = time.monotonic, time.process_time, time.sleep
    work()
    while True:
        c0 = cpu()
        work()
        dt = cpu() - c0
        try:
            out.write(f"{clock():.6f} {dt:.7f}\n")
            out.flush()
        except (BrokenPipeError, ValueError):
            return 0
        sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
