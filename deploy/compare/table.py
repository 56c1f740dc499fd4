"""Prints deploy/compare.sh's results: the median over rounds of each figure, per servable,
concurrency and system, and Sluice's ratios against FastAPI (req/s) and gaps (p50)."""
import statistics
import sys
from collections import defaultdict


def ms(text):
    """wrk's latency ('812.00us', '3.41ms', '1.02s') in milliseconds."""
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float("nan")


runs = defaultdict(list)
for line in open(sys.argv[1]):
    name, _round, servable, conc, rps, p50, p99, errs, cpu = line.split()
    cpu = float(cpu) if cpu != "-" else float("nan")
    runs[(name, servable, int(conc))].append((float(rps), ms(p50), ms(p99), int(errs), cpu))

names = sorted({k[0] for k in runs}, key=lambda n: (not n.startswith("sluice"), n))
servables = list(dict.fromkeys(k[1] for k in runs))


def med(key, i):
    values = [r[i] for r in runs.get(key, [])]
    return statistics.median(values) if values else float("nan")


print("median over %d round(s): req/s (p50 ms, p99 ms) [CPU ms per request, every process]"
      % max(len(v) for v in runs.values()))
print("%-16s %4s  " % ("servable", "conc") + "  ".join("%-34s" % n for n in names))
for s in servables:
    for c in (1, 32):
        cells = []
        for n in names:
            k = (n, s, c)
            cells.append("%-34s" % ("%.0f (%.2f, %.2f) [%.3f]%s" % (
                med(k, 0), med(k, 1), med(k, 2), med(k, 4),
                " errors" if any(r[3] for r in runs.get(k, [])) else "")))
        print("%-16s %4d  " % (s, c) + "  ".join(cells))
print()
print("Sluice against FastAPI-2 (medians): c1 p50 gap in ms, c32 req/s ratio; against FastAPI-1 at c32")
for s in servables:
    gap = med(("sluice", s, 1), 1) - med(("fastapi-2", s, 1), 1)
    r2 = med(("sluice", s, 32), 0) / med(("fastapi-2", s, 32), 0)
    r1 = med(("sluice", s, 32), 0) / med(("fastapi-1", s, 32), 0)
    print("%-16s c1 p50 gap %+.2f ms   c32 %.2fx FastAPI-2   %.2fx FastAPI-1" % (s, gap, r2, r1))
