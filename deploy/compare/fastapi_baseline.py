"""The baseline Sluice is compared with: FastAPI + onnxruntime serving the example models and
graphs in-process, speaking the same Open Inference Protocol JSON. Run by deploy/compare.sh as
`uvicorn fastapi_baseline:app --workers N` (MODELS_DIR names the ONNX files' folder)."""
import asyncio.base_events
import os
import socket

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request

# uvicorn's multi-process mode binds its socket without naming the protocol, so asyncio leaves
# TCP_NODELAY off on accepted connections and every response waits 40 ms for a delayed ACK
# (measured: 23 req/s at concurrency 1). Turn it on as a one-process uvicorn does.
def _nodelay(sock):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


asyncio.base_events._set_nodelay = _nodelay

MODELS = os.environ.get("MODELS_DIR", "examples/models")
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
SESSIONS = {
    n: ort.InferenceSession(f"{MODELS}/{n}.onnx", opts, providers=["CPUExecutionProvider"])
    for n in ["scaler", "mlp", "logreg", "forest", "heavy"]
}
DATATYPE = {np.dtype("float32"): "FP32", np.dtype("int64"): "INT64"}
app = FastAPI()


def run(name, x):
    """Runs model `name` on `x`; its outputs by name."""
    s = SESSIONS[name]
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"input": x})))


def vote(labels):
    """Majority vote over the listed models' labels, ties to the first listed."""
    out = []
    for row in zip(*labels):
        counts = [row.count(v) for v in row]
        out.append(row[counts.index(max(counts))])
    return np.asarray(out, dtype=np.int64)


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request):
    body = await request.json()
    t = body["inputs"][0]
    x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
    if name == "digits-pipeline":
        p = run("mlp", run("scaler", x)["scaled"])["probabilities"]
        outputs = {"label": p.argmax(1).astype(np.int64), "probability": p.max(1)}
    elif name == "digits-ensemble":
        s = run("scaler", x)["scaled"]
        labels = [run(m, s)["label"].tolist() for m in ["mlp", "logreg", "forest"]]
        outputs = {"label": vote(labels)}
    else:
        outputs = run(name, x)
    return {
        "model_name": name,
        "outputs": [
            {"name": k, "datatype": DATATYPE[v.dtype], "shape": list(v.shape), "data": v.ravel().tolist()}
            for k, v in outputs.items()
        ],
    }
