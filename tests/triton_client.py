"""Stock tritonclient (HTTP, default binary tensors) against a Sluice gateway.

usage: python tests/triton_client.py HOST:PORT SAMPLES_JSON [--graphs]
Exits non-zero on any mismatch with onnxruntime's expected outputs. With --graphs, also calls the
digits-pipeline and digits-ensemble graphs, which a client cannot tell from models.
"""
import json
import sys

import numpy as np
import tritonclient.http as httpclient

url, samples_path = sys.argv[1], sys.argv[2]
samples = json.load(open(samples_path))
client = httpclient.InferenceServerClient(url=url)
assert client.is_server_live() and client.is_server_ready()
assert client.is_model_ready("mlp")
meta = client.get_model_metadata("mlp")
assert meta["inputs"][0]["shape"] == [-1, 64], meta
config = client.get_model_config("mlp")
assert config["max_batch_size"] > 0, config

x = np.asarray(samples["scaled"][:8], dtype=np.float32)
inp = httpclient.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x, binary_data=True)
outputs = [httpclient.InferRequestedOutput("label", binary_data=True),
           httpclient.InferRequestedOutput("probabilities", binary_data=True)]
res = client.infer("mlp", [inp], outputs=outputs)
labels = res.as_numpy("label")
probs = res.as_numpy("probabilities")
np.testing.assert_array_equal(labels, np.asarray(samples["expected"]["mlp"]["label"][:8]))
np.testing.assert_allclose(probs, np.asarray(samples["expected"]["mlp"]["probabilities"][:8]), rtol=1e-4, atol=1e-5)
# Default outputs (none requested) and JSON input.
inp = httpclient.InferInput("input", [1, 64], "FP32")
inp.set_data_from_numpy(x[:1], binary_data=False)
res = client.infer("mlp", [inp])
assert res.as_numpy("label")[0] == samples["expected"]["mlp"]["label"][0]
stats = client.get_inference_statistics("mlp")
assert stats["model_stats"][0]["inference_count"] >= 2, stats

if "--graphs" in sys.argv:
    raw = np.asarray(samples["raw"], dtype=np.float32)
    exp = samples["expected"]
    inp = httpclient.InferInput("input", list(raw.shape), "FP32")
    inp.set_data_from_numpy(raw, binary_data=True)
    assert client.get_model_metadata("digits-pipeline")["platform"] == "sluice_graph"
    res = client.infer("digits-pipeline", [inp])
    np.testing.assert_array_equal(res.as_numpy("label"), np.asarray(exp["mlp"]["label"]))
    np.testing.assert_allclose(res.as_numpy("probability"),
                               np.asarray(exp["mlp"]["probabilities"]).max(axis=1), rtol=1e-4, atol=1e-5)
    res = client.infer("digits-ensemble", [inp])
    votes = []
    for row in zip(exp["mlp"]["label"], exp["logreg"]["label"], exp["forest"]["label"]):
        counts = [row.count(v) for v in row]
        votes.append(row[counts.index(max(counts))])  # ties: the earliest listed (mlp first)
    np.testing.assert_array_equal(res.as_numpy("label"), np.asarray(votes))
    print("tritonclient graphs OK")
print("tritonclient OK")
