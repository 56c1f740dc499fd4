"""Stock tritonclient sending BYTES tensors (binary and JSON) to the fraud graph.

usage: python tests/triton_bytes.py HOST:PORT FRAUD_SAMPLES_JSON
Exits non-zero unless the decisions (BYTES outputs) and probabilities match the expected ones.
"""
import json
import sys

import numpy as np
import tritonclient.http as httpclient

url, samples_path = sys.argv[1], sys.argv[2]
samples = json.load(open(samples_path))
rows, exp = samples["requests"][:16], samples["expected"]
client = httpclient.InferenceServerClient(url=url)
meta = client.get_model_metadata("fraud")
assert {"name": "user_id", "datatype": "BYTES", "shape": [-1]} in meta["inputs"], meta
config = client.get_model_config("fraud")
assert any(i["data_type"] == "TYPE_STRING" for i in config["input"]), config


def inputs(binary):
    def text(k):
        return np.array([r[k].encode() for r in rows], dtype=np.object_)
    columns = [("user_id", text("user_id"), "BYTES"),
               ("merchant_id", text("merchant_id"), "BYTES"),
               ("amount", np.array([r["amount"] for r in rows], np.float32), "FP32"),
               ("merchant_category", text("merchant_category"), "BYTES"),
               ("hour", np.array([r["hour"] for r in rows], np.int64), "INT64"),
               ("country", text("country"), "BYTES"),
               ("device", text("device"), "BYTES")]
    out = []
    for name, arr, dt in columns:
        i = httpclient.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr, binary_data=binary)
        out.append(i)
    return out


for binary in (True, False):
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary)
            for n in ("decision", "rule", "probabilities")]
    res = client.infer("fraud", inputs(binary), outputs=outs)
    decisions = [d.decode() if isinstance(d, bytes) else d for d in res.as_numpy("decision")]
    assert decisions == exp["decision"][:16], (binary, decisions)
    np.testing.assert_allclose(res.as_numpy("probabilities"), np.asarray(exp["probabilities"][:16]),
                               rtol=1e-4, atol=1e-5)
print("tritonclient BYTES OK")
