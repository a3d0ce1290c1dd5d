#!/usr/bin/env python3
"""Summarizes the Python benchmark's results.tsv (written by `loadgen bench`): medians
over rounds per server and scenario, ratios against the asyncio and uvloop baselines,
and the goals of issue 9.

    summary.py OUT/results.tsv
"""
from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

OURS = ["callbacks", "callbacks-batch", "pull", "asyncio"]
# Baselines: (textbook: one transport.write per reply, tuned: one per data_received)
ASYNCIO = ("asyncio-naive", "asyncio-proto")
UVLOOP = ("uvloop-naive", "uvloop-proto")
LABELS = {
    "callbacks": "tcpframe Server(on_message) + send",
    "callbacks-batch": "tcpframe Server(on_messages) + send_many",
    "pull": "tcpframe PullServer.events() + send",
    "asyncio": "tcpframe PullServer.aevents() + send",
    "asyncio-naive": "asyncio Protocol, framing in Python, a write per reply",
    "asyncio-proto": "asyncio Protocol, framing in Python, a write per data_received",
    "uvloop-naive": "the write-per-reply Protocol on uvloop",
    "uvloop-proto": "the write-per-data_received Protocol on uvloop",
}


def load(path: str) -> Tuple[Dict[Tuple[str, str], Dict[str, List[float]]], Dict[Tuple[str, str], int], List[str]]:
    cols: Dict[Tuple[str, str], Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    fails: Dict[Tuple[str, str], int] = defaultdict(int)
    order: List[str] = []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        idx = {name: i for i, name in enumerate(header)}
        for line in f:
            row = line.rstrip("\n").split("\t")
            if len(row) < len(header) - 2:
                continue
            server, scen = row[idx["server"]], row[idx["scenario"]]
            if server not in order:
                order.append(server)
            if row[idx["ok"]] != "1":
                fails[(server, scen)] += 1
                continue
            for name in ("fps", "cpu_us_per_frame", "p50_us", "p99_us", "foreign_pct", "client_core_pct"):
                try:
                    value = float(row[idx[name]])
                except (KeyError, ValueError):
                    continue
                if value == value:  # not NaN
                    cols[(server, scen)][name].append(value)
    return cols, fails, order


def main() -> None:
    cols, fails, order = load(sys.argv[1])

    def med(server: str, scen: str, name: str) -> Optional[float]:
        values = cols.get((server, scen), {}).get(name)
        return statistics.median(values) if values else None

    def fmt(x: Optional[float], prec: int = 0) -> str:
        if x is None:
            return "-"
        return f"{x:,.{prec}f}"

    rounds = max((len(v.get("fps", [])) for v in cols.values()), default=0)
    print(f"Python hosts, medians of {rounds} round(s); 64 B frames; server on core 0, load on core 1.\n")
    print("| server | what | s1 p50 µs | s1 p99 µs | s2 1×64 frames/s | s2 µs CPU/frame "
          "| s3 50×16 frames/s | s3 µs CPU/frame | s3 client core % | failed runs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for server in order:
        nfail = sum(n for (s, _), n in fails.items() if s == server)
        print(f"| {server} | {LABELS.get(server, '')} | {fmt(med(server, 's1', 'p50_us'), 1)} "
              f"| {fmt(med(server, 's1', 'p99_us'), 1)} | {fmt(med(server, 's2', 'fps'))} "
              f"| {fmt(med(server, 's2', 'cpu_us_per_frame'), 3)} | {fmt(med(server, 's3', 'fps'))} "
              f"| {fmt(med(server, 's3', 'cpu_us_per_frame'), 3)} | {fmt(med(server, 's3', 'client_core_pct'))} "
              f"| {nfail or ''} |")
    noisy = sorted({s for (s, sc), v in cols.items() for x in v.get("foreign_pct", []) if x > 15})
    if noisy:
        print(f"\nWARNING: other processes used > 15 % of a core during some runs of: {', '.join(noisy)} "
              "(see results.tsv, foreign_pct): those numbers are noisy.")

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a is not None and b else None

    print("\nRatios of frames/s (of medians) and the goals of issue 9 (✓/✗ on the modes the goals "
          "name). Each cell: against the write-per-reply baseline / against the write-per-"
          "data_received one.\n")
    print("| server | s3 / asyncio (goal ≥ 2) | s3 / uvloop (goal ≥ 1) | s2 / asyncio (goal ≥ 1) "
          "| s3 µs CPU/frame (goal ≤ 1.5, callbacks) |")
    print("|---|---:|---:|---:|---:|")

    def mark(x: Optional[float], goal: float, above: bool = True, applies: bool = True) -> str:
        if x is None:
            return "-"
        text = f"{x:.2f}"
        if not applies:
            return text
        return text + (" ✓" if (x >= goal if above else x <= goal) else " ✗")

    def pair(server: str, scen: str, bases: Tuple[str, str], goal: float, applies: bool) -> str:
        ours = med(server, scen, "fps")
        return " / ".join(mark(ratio(ours, med(b, scen, "fps")), goal, applies=applies) for b in bases)

    for server in [s for s in order if s in OURS]:
        goals = server in ("callbacks", "pull")  # the goals name these two modes
        cpu = med(server, "s3", "cpu_us_per_frame")
        print(f"| {server} | {pair(server, 's3', ASYNCIO, 2.0, goals)} | {pair(server, 's3', UVLOOP, 1.0, goals)} "
              f"| {pair(server, 's2', ASYNCIO, 1.0, goals)} "
              f"| {mark(cpu, 1.5, above=False, applies=server == 'callbacks')} |")
    print("\nThe load generator's core is near 100 % busy in s3 with the fastest servers: then it,"
          " not the server, bounds frames/s, and µs CPU/frame is the fair comparison.")


if __name__ == "__main__":
    main()
