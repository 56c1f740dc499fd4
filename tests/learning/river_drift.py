"""River's Page-Hinkley on seeded error streams (a 0/1 error rate that rises, then falls).
Prints JSON: each stream's values and, for mode "both" and "up", the indices where River
reported drift."""
import json
import random
import sys

from river import drift

streams = []
for seed, rates in [(1, [0.1, 0.5, 0.1]), (2, [0.05, 0.3]), (3, [0.2, 0.2])]:
    rng = random.Random(seed)
    xs = [float(rng.random() < r) for r in rates for _ in range(1500)]
    out = {"values": xs}
    for mode in ("both", "up"):
        d = drift.PageHinkley(mode=mode)
        hits = []
        for i, x in enumerate(xs):
            d.update(x)
            if d.drift_detected:
                hits.append(i)
        out[mode] = hits
    streams.append(out)
json.dump(streams, sys.stdout)
