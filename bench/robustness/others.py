#!/usr/bin/env python3
"""others.py snap FILE | diff FILE | wait SECS PCT: CPU used by *other* processes.

`snap` records, for every process, utime+stime and cutime+cstime (clock ticks,
/proc/PID/stat) and the time; `diff` prints the CPU that processes outside this
process group (the benchmark's own programs are in it) used since, in % of one
core, and the busiest one's name. Children that exited in between count through
their parent's cutime (so it can over-state; capped by the machine's
user+nice+system time, /proc/stat, minus this group's). Kernel threads are not counted
(ksoftirqd mostly carries the benchmark's own loopback traffic). `wait` samples
0.5 s windows until others used at most PCT % of a core, for at most SECS
seconds, and prints how long it waited. Used by run.sh to wait for, flag and
run again fairness runs during which someone else was busy."""
import json
import os
import sys
import time

TCK = os.sysconf("SC_CLK_TCK")


def snapshot():
    me = os.getpgrp()
    procs = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index("(") + 1:s.rindex(")")]
        f = s[s.rindex(")") + 2:].split()
        # fields after comm: state(0) ppid(1) pgrp(2) ... utime(11) stime(12) cutime(13) cstime(14) starttime(19)
        if int(f[2]) == me or int(f[1]) == 2 or p == "2":
            continue  # our own programs; kernel threads (ksoftirqd: our own loopback traffic)
        procs[p] = (comm, int(f[11]) + int(f[12]), int(f[13]) + int(f[14]), f[19])
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    ours = 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    s = f.read()
            except OSError:
                continue
            f = s[s.rindex(")") + 2:].split()
            if int(f[2]) == me:
                ours += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    # user + nice + system of the whole machine (no irq/softirq: our own traffic's)
    return {"t": time.monotonic(), "procs": procs, "busy": cpu[0] + cpu[1] + cpu[2], "ours": ours}


def main():
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "wait":
        budget, pct = float(sys.argv[2]), float(sys.argv[3])
        t0 = time.monotonic()
        while time.monotonic() - t0 < budget:
            a = snapshot()
            time.sleep(0.5)
            if other_pct(a, snapshot())[0] <= pct:
                break
        print(f"{time.monotonic() - t0:.0f}")
        return
    if mode == "snap":
        with open(path, "w") as f:
            json.dump(snapshot(), f)
        return
    with open(path) as f:
        a = json.load(f)
    pct, top = other_pct(a, snapshot())
    print(f"other_pct={pct:.0f} busiest={top.replace(' ', '_')}")


def other_pct(a, b):
    dt = b["t"] - a["t"]
    by = {}
    for p, (comm, own, kids, start) in b["procs"].items():
        old = a["procs"].get(p)
        if old and old[3] == start:
            used = (own - old[1]) + (kids - old[2])
        else:
            used = own + kids  # started during the window
        if used > 0:
            by[comm] = by.get(comm, 0) + used
    total = sum(by.values()) / TCK
    # cutime can credit a whole child's life to the window: never more than the
    # machine's busy time (user+nice+system) minus our own programs'
    if "busy" in a and "busy" in b:
        cap = ((b["busy"] - a["busy"]) - (b["ours"] - a["ours"])) / TCK
        total = max(0.0, min(total, cap))
    top = max(by.items(), key=lambda kv: kv[1])[0] if by else "-"
    return (100 * total / dt if dt > 0 else 0.0), top


main()
