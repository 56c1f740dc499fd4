"""Replays a drifting SEA stream through the gateway with feedback and prints progressive
accuracy: the online learner (`sea`) and its frozen copy (`sea-frozen`, learns only the first
2,000 examples) side by side, per window, and writes a PNG plot.

SEA (Street & Kim 2001): three features uniform on [0, 10]; the label is x0 + x1 > threshold.
The threshold is 7 (SEA variant 2) until the change point, then 9.5 (variant 3), so a model
learned before the change is wrong on a band of inputs after it. Generated here, seeded.

Each event is answered by both models, then its true label is sent as feedback (as a client
learning the outcome would). With River installed (it is in .venv), River's own
StandardScaler | LogisticRegression(SGD(0.05)) runs on the same stream in this process, predict
then learn with no delay, as a third column: what the served learner is to be compared with. Usage (the stack from `deploy/up.sh examples/sea.toml` running):

    .venv/bin/python examples/sea_drift.py [--events 10000] [--drift 5000] [--plot sea.png]
"""
import argparse
import http.client
import json
import random
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

MODELS = ("sea", "sea-frozen")


def sea(n, drift, seed):
    rng = random.Random(seed)
    for t in range(n):
        x = [rng.uniform(0, 10) for _ in range(3)]
        threshold = 7.0 if t < drift else 9.5
        yield x, int(x[0] + x[1] > threshold)


class Client(threading.local):
    """One keep-alive connection per thread."""

    def __init__(self, host, port):
        self.conn = http.client.HTTPConnection(host, port, timeout=30)

    def post(self, path, body):
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}


def event(client, x, y):
    """Both models' labels for x, then feedback y to each."""
    labels = {}
    for m in MODELS:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": x}]}
        status, r = client.post(f"/v2/models/{m}/infer", body)
        if status != 200:
            raise RuntimeError(f"{m} infer: {status} {r}")
        out = {o["name"]: o["data"][0] for o in r["outputs"]}
        labels[m] = (int(out["label"]), int(out["weights_version"]))
        status, r = client.post(f"/v2/models/{m}/feedback", {"id": r["id"], "truth": y})
        if status != 202:
            raise RuntimeError(f"{m} feedback: {status} {r}")
    return labels


def river_run(events):
    """River's online pipeline on the same events (None without River)."""
    try:
        from river import linear_model, optim, preprocessing
    except ImportError:
        return None
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression(optim.SGD(0.05))
    out = []
    for x, y in events:
        row = {i: v for i, v in enumerate(x)}
        out.append(int(model.predict_proba_one(row).get(True, 0.0) > 0.5) == y)
        model.learn_one(row, bool(y))
    return [int(c) for c in out]


def windows(drift, n):
    """Before the change, right after it, recovering, well after."""
    return [
        ("before", 0, drift),
        ("just after", drift, min(n, drift + 500)),
        ("recovering", min(n, drift + 500), min(n, drift + 2000)),
        ("well after", min(n, drift + 2000), n),
    ]


def plot(path, correct, drift, width=800, height=400):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    n = len(correct[MODELS[0]])
    pad, span = 40, 200

    def xy(t, acc):
        return pad + (width - 2 * pad) * t / max(1, n - 1), height - pad - (height - 2 * pad) * acc

    d.rectangle([pad, pad, width - pad, height - pad], outline="black")
    for acc in (0.0, 0.5, 1.0):
        d.text((5, xy(0, acc)[1] - 6), f"{acc:.1f}", fill="black")
    dx = xy(drift, 0.5)[0]
    d.line([dx, pad, dx, height - pad], fill="gray")
    for k, (m, colour) in enumerate(zip(correct, ("blue", "red", "green"))):
        c = correct[m]
        pts = [xy(t, sum(c[max(0, t - span):t + 1]) / len(c[max(0, t - span):t + 1])) for t in range(0, n, 10)]
        d.line(pts, fill=colour, width=2)
        d.text((pad + 5, pad + 5 + 15 * k), f"{m} (accuracy over the last {span})", fill=colour)
    d.text((dx + 4, height - pad - 15), "change", fill="gray")
    img.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="127.0.0.1:8000")
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--drift", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--plot", default="sea_drift.png")
    ap.add_argument("--json", action="store_true", help="print the windows' accuracies as JSON")
    a = ap.parse_args()
    host, port = a.url.split(":")
    client = Client(host, int(port))
    events = list(sea(a.events, a.drift, a.seed))
    correct = {m: [0] * len(events) for m in MODELS}
    with ThreadPoolExecutor(a.concurrency) as pool:
        for t, labels in enumerate(pool.map(lambda e: event(client, *e), events)):
            for m in MODELS:
                correct[m][t] = int(labels[m][0] == events[t][1])
            if t % 1000 == 999 and not a.json:
                print(f"  {t + 1} events; weights versions " + ", ".join(f"{m} {labels[m][1]}" for m in MODELS), file=sys.stderr)
    columns = list(MODELS)
    river = river_run(events)
    if river is not None:
        correct["river"] = river
        columns.append("river")
    table = {}
    for name, lo, hi in windows(a.drift, a.events):
        if hi > lo:
            table[name] = {m: sum(correct[m][lo:hi]) / (hi - lo) for m in columns}
    if a.json:
        print(json.dumps(table))
    else:
        print(f"{'window':<12} " + " ".join(f"{m:>11}" for m in columns))
        for name, accs in table.items():
            print(f"{name:<12} " + " ".join(f"{accs[m]:>11.3f}" for m in columns))
    if a.plot:
        plot(a.plot, correct, a.drift)
        print(f"plot: {a.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
