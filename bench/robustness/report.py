#!/usr/bin/env python3
"""report.py OUT REPS SECS ELAPSED: the robustness table from OUT/raw.txt (and
OUT/cpu/results.tsv when the cpu section ran). Medians over reps; every rep's
value is listed too, so the spread is visible."""
import os
import shlex
import statistics
import sys

OUT, REPS, SECS, ELAPSED = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
BIN = os.path.join(OUT, "bin")
rows = []
with open(os.path.join(OUT, "raw.txt")) as f:
    for line in f:
        d = {}
        try:
            toks = shlex.split(line)
        except ValueError:
            toks = line.split()
        for tok in toks:
            if "=" in tok:
                k, v = tok.split("=", 1)
                d[k] = v
            elif tok.isupper():
                d["kind"] = tok
        rows.append(d)


def label(v):
    p = os.path.join(BIN, v, "LABEL")
    return open(p).read().strip() if os.path.exists(p) else v


variants = [v for v in ("head", "before") if os.path.exists(os.path.join(BIN, v, "LABEL"))]
HEAD = label("head")
BEFORE = label("before") if "before" in variants else None


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(x, nd=0):
    return "-" if x is None else f"{x:.{nd}f}"


def each(vals, nd=0):
    return "/".join(fmt(v, nd) for v in vals)


def sel(**kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


out = []
P = out.append
built = open(os.path.join(BIN, "head", "BUILT_FROM")).read().strip() if os.path.exists(os.path.join(BIN, "head", "BUILT_FROM")) else "?"
P(f"Robustness figures: medians over {REPS} rep(s) (each rep's value after the median, in run order); "
  f"`{HEAD}` = library from {built}" + (f", `{BEFORE}` = the library at that commit" if BEFORE else "") + ".")
P("")

# ---------------------------------------------------------------- fairness
NOISE = float(os.environ.get("ROB_NOISE_PCT", "15"))


def quiet(r):
    o = num(r.get("other_pct"))
    return o is not None and o <= NOISE


fair = sel(test="fair")
if fair:
    P(f"**Fairness**: connection B's ping-pong (64 B, one in flight) while connection A streams frames of the "
      f"given payload as fast as the server takes them; {SECS} s per run, server on core 0, load on core 1. "
      "Goal: tcpframe p99 <= 2x epoll_c's p99 under the same load. `others %`: CPU other processes used during "
      f"each rep's run, in % of one core; a run above {NOISE:.0f} is noise (it was run again up to twice, the "
      "quietest kept). `paired`: median over the reps where both runs were quiet of tcpframe's p99 / epoll_c's "
      "p99 in the same rep (run back to back), with how many pairs; the goal is judged on it, or on the ratio "
      "of all reps' medians (marked *) when no pair was quiet.")
    P("")
    P("| A streams | server | p50 us | p99 us | p99 each rep | others % each rep | p99.9 us | A echoed MB/s | p99 / epoll_c | paired (n) | goal |")
    P("|---|---|---:|---:|---|---|---:|---:|---:|---:|---|")
    servers = ["epoll_c"] + variants

    def runs(s, mode, pl):
        return [r for r in fair if r.get("variant") == s and r.get("mode") == mode and (mode == "none" or r.get("payload") == pl)]

    for pl in ("none", "1", "64", "4096"):
        mode = "none" if pl == "none" else "blast"
        base = runs("epoll_c", mode, pl)
        if not base:
            continue
        base_p99 = med([num(r.get("p99_us")) for r in base])
        for s in servers:
            rs = runs(s, mode, pl)
            if not rs:
                continue
            p99 = med([num(r.get("p99_us")) for r in rs])
            name = "epoll_c" if s == "epoll_c" else label(s)
            ratio, paired, goal = "1.00", "", ""
            if s != "epoll_c":
                rt = p99 / base_p99 if (p99 is not None and base_p99) else None
                ratio = fmt(rt, 2)
                pr = []
                for r in rs:
                    e = [x for x in base if x.get("rep") == r.get("rep")]
                    if e and quiet(r) and quiet(e[0]) and num(r.get("p99_us")) and num(e[0].get("p99_us")):
                        pr.append(num(r["p99_us"]) / num(e[0]["p99_us"]))
                judged = med(pr) if pr else rt
                paired = f"{fmt(med(pr), 2)} ({len(pr)})" if pr else "- (0)"
                goal = "" if judged is None else ("met" if judged <= 2.0 else "**missed**") + ("" if pr else " *")
                if mode == "none":
                    goal = "(no load)"
            bad = [r.get("status") for r in rs if r.get("status") != "ok"]
            if bad:
                goal += f" {len(bad)} run(s) {','.join(sorted(set(str(b) for b in bad)))}"
            what = "nothing" if pl == "none" else f"{pl} B frames"
            P(f"| {what} | {name} | {fmt(med([num(r.get('p50_us')) for r in rs]))} | {fmt(p99)} | "
              f"{each([num(r.get('p99_us')) for r in rs])} | {'/'.join(r.get('other_pct', '?') for r in rs)} | "
              f"{fmt(med([num(r.get('p999_us')) for r in rs]))} | "
              f"{'-' if mode == 'none' else fmt(med([num(r.get('a_back_mbps')) for r in rs]), 1)} | {ratio} | {paired} | {goal} |")
    P("")

# ---------------------------------------------------------------- outmem
om = sel(test="outmem")
if om:
    P("**Queued output memory**: 20 peers that never read (receive buffer 16 KiB), max queued output 16 MiB "
      "(320 MiB in all); a host thread sends frames until TF_ERR_FULL on every connection; server-process VmRSS "
      "peak minus before. `unpinned`: loop and host thread on either core; `1 core`: the whole process pinned to core 0. "
      "Goal: growth <= 1.25 x 320 MiB + 64 KiB per connection = 401 MiB.")
    P("")
    P("| frames | library | placement | RSS growth MiB | each rep | / 320 MiB | growth at end MiB | accepted by tf_send MiB | time to full s | goal |")
    P("|---|---|---|---:|---|---:|---:|---:|---:|---|")
    for f in ("1", "64", "4096", "1048576"):
        for v in variants:
            for pin, pname in (("none", "unpinned"), ("core0", "1 core")):
                rs = [r for r in om if r.get("variant") == v and r.get("pin") == pin and r.get("frame") == f]
                if not rs:
                    continue
                g = [num(r.get("growth_mib")) for r in rs]
                mg = med(g)
                bad = [r.get("status") for r in rs if r.get("status") != "full"]
                goal = "-" if mg is None else ("met" if mg <= 401.25 else "**missed**")
                if bad:
                    goal += f" ({len(bad)} run(s) {','.join(sorted(set(str(b) for b in bad)))})"
                fl = {"1": "1 B", "64": "64 B", "4096": "4 KiB", "1048576": "1 MiB"}[f]
                P(f"| {fl} | {label(v)} | {pname} | {fmt(mg)} | {each(g)} | {fmt(mg / 320 if mg is not None else None, 2)} | "
                  f"{fmt(med([num(r.get('end_growth_mib')) for r in rs]))} | {fmt(med([num(r.get('queued_mib')) for r in rs]))} | "
                  f"{fmt(med([num(r.get('fill_s')) for r in rs]), 1)} | {goal} |")
    P("")

# ---------------------------------------------------------------- amp
amp = sel(test="amp")
if amp:
    P("**Partial-frame budget**: 1,000 peers each announce 8 MiB and send 3 MiB of it, default budget "
      "(1 GiB); server VmRSS once it stopped reading. Goal: RSS <= budget + a constant (checked here: "
      "1024 + 64 MiB), the extra peers closed with TF_CLOSE_OVERLOAD (9).")
    P("")
    P("| library | RSS MiB | each rep | peak (VmHWM) MiB | connections kept | closed OVERLOAD | read in all MiB | time to read s | RSS 2 s after all closed MiB | goal |")
    P("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for v in variants:
        rs = [r for r in amp if r.get("variant") == v]
        rss = [num(r.get("rss_mib")) for r in rs]
        m = med(rss)
        ov = med([num(r.get("overload")) for r in rs])
        goal = "-" if m is None else ("met" if m <= 1088 and (ov or 0) > 0 else "**missed**")
        bad = [r.get("status") for r in rs if r.get("status") != "ok"]
        if bad:
            goal += f" ({len(bad)} run(s) {','.join(sorted(set(str(b) for b in bad)))})"
        P(f"| {label(v)} | {fmt(m)} | {each(rss)} | {fmt(med([num(r.get('hwm_mib')) for r in rs]))} | "
          f"{fmt(med([num(r.get('active')) for r in rs]))} | {fmt(ov)} | {fmt(med([num(r.get('read_mib')) for r in rs]))} | "
          f"{fmt(med([num(r.get('read_s')) for r in rs]), 1)} | {fmt(med([num(r.get('rss_after_close_mib')) for r in rs]))} | {goal} |")
    P("")

# ---------------------------------------------------------------- oom
oom = sel(test="oom")
if oom:
    P("**Allocation failure**: examples-c/echo_server under `ulimit -v 400000`; 100 peers announce 8 MiB and "
      "send 4 MiB each; a connection opened before and one opened after must still echo. Goal: the process "
      "lives, the others are served.")
    P("")
    P("| library | runs | server alive after | bystander echoes | new connection echoes | attackers' sends done (of 100) | closed OVERLOAD | exit status | stderr |")
    P("|---|---:|---|---|---|---|---|---|---|")
    for v in variants:
        rs = [r for r in oom if r.get("variant") == v]
        j = lambda k: "/".join(r.get(k, "?").split("/")[0] for r in rs)
        P(f"| {label(v)} | {len(rs)} | {j('alive_after')} | {j('bystander')} | {j('new_conn')} | {j('attackers_sent')} | "
          f"{j('closed_overload')} | {j('exit')} | {rs[0].get('stderr', '') or '(empty)'} |")
    P("")

# ---------------------------------------------------------------- cpu
tsv = os.path.join(OUT, "cpu", "results.tsv")
if os.path.exists(tsv):
    lines = open(tsv).read().splitlines()
    hdr = lines[0].split("\t")
    recs = [dict(zip(hdr, l.split("\t"))) for l in lines[1:]]
    P(f"**CPU per frame** (no regression): bench/loadgen scenarios, echo_server -b epoll built against each "
      f"library, and epoll_c; server CPU (utime+stime) / echoed frames, median of {REPS} round(s) (each round's value after it).")
    P("")
    names = ["tcpframe"] + ([BEFORE] if BEFORE else []) + ["epoll_c"]
    P("| scenario | " + " | ".join(f"{n} us/frame" for n in names) + (f" | {HEAD} / {BEFORE}" if BEFORE else "") + " | tcpframe / epoll_c |")
    P("|---|" + "---:|" * (len(names) + (2 if BEFORE else 1)))
    labels = {}
    for r in recs:
        labels.setdefault(r["scenario"], r["label"])
    for sc in labels:
        cells, meds = [], {}
        for n in names:
            vals = [num(r["cpu_us_per_frame"]) for r in recs if r["scenario"] == sc and r["server"] == n and r["ok"] == "1"]
            meds[n] = med(vals)
            cells.append(f"{fmt(meds[n], 3)} ({each(vals, 3)})")
        ratio_b = fmt(meds["tcpframe"] / meds[BEFORE], 2) if BEFORE and meds["tcpframe"] and meds.get(BEFORE) else "-"
        ratio_c = fmt(meds["tcpframe"] / meds["epoll_c"], 2) if meds["tcpframe"] and meds["epoll_c"] else "-"
        P(f"| {labels[sc]} | " + " | ".join(cells) + (f" | {ratio_b}" if BEFORE else "") + f" | {ratio_c} |")
    P("")

P(f"Run: {ELAPSED} s; machine: {os.cpu_count()} cores, load average at the end {open('/proc/loadavg').read().split()[0]}. "
  f"Raw lines: {os.path.join(OUT, 'raw.txt')}.")
print("\n".join(out))
