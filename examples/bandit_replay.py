#!/usr/bin/env python3
"""Replays digit images through a bandit graph of examples/bandit.toml and gives each answer
its reward (1 when the chosen model's label is right, else 0) as feedback.

The images change mid-stream: first a dim camera (pixels x0.7: the MLP is the best arm), then a
camera with stuck pixels (10% of pixels at full brightness: the random forest is, by far). Every
image is also run locally through all three ONNX models, so the script knows what each arm
would have earned and prints, per window, the bandit's accuracy and its arm shares next to each
fixed arm's, and at the end the bandit's regret against the best fixed arm and against
choosing uniformly. Writes a PNG plot.

  .venv/bin/python examples/bandit_replay.py [--graph digits-bandit] [--events 4000]
"""
import argparse
import http.client
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from sklearn.datasets import load_digits

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = ["logreg", "mlp", "forest"]


class Client(threading.local):
    """One keep-alive connection per thread."""

    def __init__(self, host, port):
        self.conn = http.client.HTTPConnection(host, port, timeout=30)

    def post(self, path, body):
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}


def stream(n, change, seed):
    """(image, label, context) per event: dim images, then images with stuck pixels."""
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        i = rng.integers(len(X))
        x = X[i] * 0.7 if t < change else np.where(rng.random(64) < 0.1, 16.0, X[i])
        context = [1.0, float((x >= 15.5).mean()) * 5]
        out.append((x.astype(np.float32), int(y[i]), context))
    return out


def would_earn(events):
    """Each arm's reward on each event, from onnxruntime locally."""
    def session(name):
        return ort.InferenceSession(os.path.join(HERE, "models", f"{name}.onnx"), providers=["CPUExecutionProvider"])
    xs = np.stack([e[0] for e in events])
    scaled = session("scaler").run(None, {"input": xs})[0]
    labels = np.array([e[1] for e in events])
    return {a: (session(a).run(None, {"input": scaled})[0].reshape(-1) == labels).astype(float) for a in ARMS}


def event(client, graph, x, label, context, contextual):
    inputs = [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x.tolist()}]
    if contextual:
        inputs.append({"name": "context", "datatype": "FP32", "shape": [1, 2], "data": context})
    status, r = client.post(f"/v2/models/{graph}/infer", {"inputs": inputs})
    if status != 200:
        raise RuntimeError(f"infer: {status} {r}")
    served = r["parameters"]["served_by"]
    served = json.loads(served) if isinstance(served, str) else served
    arm = next(a for a in ARMS if a in served)
    out = {o["name"]: o["data"] for o in r["outputs"]}
    reward = float(int(out["label"][0]) == label)
    status, fr = client.post(f"/v2/models/{graph}/feedback", {"id": r["id"], "reward": reward})
    if status != 202:
        raise RuntimeError(f"feedback: {status} {fr}")
    return arm, reward


def plot(path, got, would, change, width=800, height=400, span=200):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    n, pad = len(got), 40

    def xy(t, v):
        return pad + (width - 2 * pad) * t / max(1, n - 1), height - pad - (height - 2 * pad) * v

    d.rectangle([pad, pad, width - pad, height - pad], outline="black")
    for v in (0.0, 0.5, 1.0):
        d.text((5, xy(0, v)[1] - 6), f"{v:.1f}", fill="black")
    cx = xy(change, 0.5)[0]
    d.line([cx, pad, cx, height - pad], fill="gray")
    lines = {"bandit": got, **{f"always {a}": would[a] for a in ARMS}}
    for k, ((name, c), colour) in enumerate(zip(lines.items(), ("black", "orange", "blue", "green"))):
        pts = [xy(t, float(np.mean(c[max(0, t - span):t + 1]))) for t in range(0, n, 10)]
        d.line(pts, fill=colour, width=3 if name == "bandit" else 1)
        d.text((pad + 5, height - pad - 70 + 15 * k), f"{name} (reward over the last {span})", fill=colour)
    d.text((cx + 4, height - pad - 15), "change", fill="gray")
    img.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="127.0.0.1:8000")
    ap.add_argument("--graph", default="digits-bandit")
    ap.add_argument("--events", type=int, default=4000)
    ap.add_argument("--change", type=int, default=None, help="default: half way")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--plot", default="bandit.png")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args()
    change = a.events // 2 if a.change is None else a.change
    host, port = a.url.split(":")
    client = Client(host, int(port))
    events = stream(a.events, change, a.seed)
    would = would_earn(events)
    contextual = a.graph.endswith("linucb")
    with ThreadPoolExecutor(a.concurrency) as pool:
        results = list(pool.map(lambda e: event(client, a.graph, *e, contextual), events))
    arms = [r[0] for r in results]
    got = np.array([r[1] for r in results])
    # Regret against the best single arm over the whole stream, and against uniform choice.
    best_arm = max(ARMS, key=lambda k: would[k].sum())
    uniform = float(np.mean([would[k] for k in ARMS], axis=0).sum())
    oracle = float(np.max([would[k] for k in ARMS], axis=0).sum())
    figures = {
        "events": a.events,
        "reward": float(got.sum()),
        "fixed_arm_rewards": {k: float(would[k].sum()) for k in ARMS},
        "best_fixed_arm": best_arm,
        "best_fixed_reward": float(would[best_arm].sum()),
        "uniform_reward": uniform,
        "oracle_reward": oracle,
        "regret_vs_best_fixed": float(would[best_arm].sum() - got.sum()),
        "regret_vs_uniform": float(uniform - got.sum()),
        "windows": {},
    }
    for name, lo, hi in [("before", 0, change), ("just after", change, min(a.events, change + 500)),
                         ("after", min(a.events, change + 500), a.events)]:
        if hi > lo:
            figures["windows"][name] = {
                "bandit": float(got[lo:hi].mean()),
                **{f"always {k}": float(would[k][lo:hi].mean()) for k in ARMS},
                "shares": {k: arms[lo:hi].count(k) / (hi - lo) for k in ARMS},
            }
    if a.json:
        print(json.dumps(figures))
    else:
        print(f"{'window':<11} {'bandit':>7} " + " ".join(f"{'always ' + k:>13}" for k in ARMS) + "   arm shares")
        for name, w in figures["windows"].items():
            shares = ", ".join(f"{k} {w['shares'][k]:.2f}" for k in ARMS)
            print(f"{name:<11} {w['bandit']:>7.3f} " + " ".join(f"{w['always ' + k]:>13.3f}" for k in ARMS) + f"   {shares}")
        fixed = ", ".join(f"{k} {v:.0f}" for k, v in figures["fixed_arm_rewards"].items())
        print(f"reward {figures['reward']:.0f} of {a.events}: best fixed arm ({best_arm}) {figures['best_fixed_reward']:.0f}, "
              f"uniform {uniform:.0f}, oracle {oracle:.0f} (each arm alone: {fixed})")
        print(f"regret vs best fixed arm {figures['regret_vs_best_fixed']:.0f}; vs uniform {figures['regret_vs_uniform']:.0f} "
              "(negative: the bandit earned more)")
    if a.plot:
        plot(a.plot, got, would, change)
        print(f"plot: {a.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
