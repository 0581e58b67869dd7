#!/usr/bin/env python3
"""Make a recorded v2 trace longer by repeating its steady steps, to predict long runs.

    python3 scripts/extend_trace.py IN.trace.gz OUT.trace.gz --copies 16 [--between A B]

Real runs recorded for `traces/recorded/` stop after about twelve steps; some effects show
only later (ResNet-50's peak creeps over 80 steps under the default configuration). This
takes the events between two points of the trace where the same number of allocations is
live (found by itself: the lowest live count, reached once per step; or given as event
indices with --between) and appends that stretch COPIES more times, each shifted in time by
its length. Allocations made in the stretch get new ids in every copy; an allocation live at
its start and freed inside it (a gradient freed by `zero_grad`, say) stands, in the next copy,
for the allocation of the same size made inside the stretch and still live at its end.
Completion markers (`c`) follow their frees. Whatever is live at the end is freed then. The
recorded peaks (`#! real_peak_*`) are dropped: the new trace was never run.

Replay it like any trace: `accelrt replay --json OUT.trace.gz [--alloc-conf ...]`.
"""
import argparse
import gzip
import sys
from collections import defaultdict


def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].startswith("#accelrt-trace v2"):
        sys.exit(f"{path}: not an accelrt v2 trace (its first line is not '#accelrt-trace v2')")
    header = [l for l in lines if l.startswith("#")]
    events = [l.split() for l in lines if l and not l.startswith("#")]
    for i, e in enumerate(events):
        if e[0] not in ("a", "f", "u", "c") or len(e) < 3:
            sys.exit(f"{path}: event {i} is not an a/f/u/c line: {' '.join(e)!r}")
    return header, events


def live_counts(events):
    live, counts = set(), []
    for e in events:
        if e[0] == "a":
            live.add(e[1])
        elif e[0] == "f":
            live.discard(e[1])
        counts.append(len(live))
    return counts


def live_at(events, i):
    live = {}
    for e in events[: i + 1]:
        if e[0] == "a":
            live[e[1]] = int(e[2])
        elif e[0] == "f":
            live.pop(e[1], None)
    return live


def find_stretch(counts):
    """Two step boundaries: the live count's local lows past the first sixth of the trace
    (one a step, at the count most of them share), the first and the last of them, so the
    stretch holds whole steps. The run's end, where everything is freed, is not one."""
    n = len(counts)
    window = max(200, n // 40)
    lows = [i for i in range(n // 6, n - 1)
            if counts[i] == min(counts[max(0, i - window) : i + window])]
    points = []
    for i in lows:
        if not points or i - points[-1] > window:
            points.append(i)
    if points:
        common = max(set(counts[i] for i in points), key=lambda c: sum(counts[i] == c for i in points))
        points = [i for i in points if counts[i] == common]
    if len(points) < 2:
        sys.exit("no two step boundaries with the same live count: give --between A B")
    return points[0], points[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--between", type=int, nargs=2, metavar=("A", "B"))
    args = ap.parse_args()
    if args.copies < 1:
        sys.exit("--copies: at least 1")
    header, events = read(args.input)
    counts = live_counts(events)
    a, b = args.between or find_stretch(counts)
    if not 0 <= a < b < len(events) or counts[a] != counts[b]:
        sys.exit(f"--between {a} {b}: two event indices, in order, with the same live count")
    start, end = live_at(events, a), live_at(events, b)
    freed_inside = {k: v for k, v in start.items() if k not in end}
    made_inside = {k: v for k, v in end.items() if k not in start}
    by_size = defaultdict(list)
    for k, v in made_inside.items():
        by_size[v].append(k)
    stands_for = {}
    for k, v in freed_inside.items():
        if not by_size[v]:
            sys.exit(f"events {a}-{b}: allocation {k} ({v} bytes) is freed inside and no "
                     "allocation of its size is made inside and live at the end: not a whole step")
        stands_for[k] = by_size[v].pop()
    stretch = events[a + 1 : b + 1]
    made = {e[1] for e in stretch if e[0] == "a"}
    frees = [e[1] for e in stretch if e[0] == "f"]
    marked = {e[1] for e in stretch if e[0] == "c"}
    later_mark = {}
    for e in events[b + 1 :]:
        if e[0] == "c":
            later_mark.setdefault(e[1], int(e[2]))
    t = lambda e: int(e[-1])
    length = max(t(events[b]) - t(events[a]), 1)
    stride = max(int(e[1]) for e in events if e[0] == "a") + 1

    out = [e[:] for e in events[: b + 1]]
    freed_by_b = {e[1] for e in out if e[0] == "f"}
    marked_by_b = {e[1] for e in out if e[0] == "c"}
    for x in sorted(freed_by_b - marked_by_b, key=int):
        if x in later_mark:
            out.append(["c", x, str(later_mark[x])])
    for copy in range(1, args.copies + 1):
        def rename(x):
            if x in made:
                return str(int(x) + copy * stride)
            if x in stands_for:
                y = stands_for[x]
                return str(int(y) + (copy - 1) * stride) if copy > 1 else y
            return None  # a marker of a free made before the stretch: already written

        for e in stretch:
            x = rename(e[1])
            if x is not None:
                out.append([e[0], x] + e[2:-1] + [str(t(e) + copy * length)])
        for x in frees:
            if x not in marked and x in later_mark:
                out.append(["c", rename(x), str(later_mark[x] + copy * length)])
    live = set()
    for e in out:
        if e[0] == "a":
            live.add(e[1])
        elif e[0] == "f":
            live.discard(e[1])
    end_time = max(t(e) for e in out) + 1
    out.extend(["f", x, str(end_time)] for x in sorted(live, key=int))
    opener = gzip.open if args.output.endswith(".gz") else open
    with opener(args.output, "wt") as f:
        for h in header:
            if not h.startswith("#! real_peak"):
                f.write(h + "\n")
        f.write(f"#! extended=events {a}-{b} repeated {args.copies} more times\n")
        for e in out:
            f.write(" ".join(e) + "\n")
    print(f"{args.output}: {len(out)} events; events {a}-{b} ({b - a}, "
          f"{length / 1e3:.0f} ms of the recording) repeated {args.copies} more times")


if __name__ == "__main__":
    main()
