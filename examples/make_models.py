#!/usr/bin/env python3
"""Builds Sluice's example models.

  python examples/make_models.py --small   # train scaler/mlp/logreg/forest on scikit-learn's digits,
                                           # export ONNX (committed) and samples.json (committed)
  python examples/make_models.py           # generate `heavy` (random weights, seed 0) and its
                                           # expected outputs; done by deploy/setup.sh, not committed

Expected outputs are computed with onnxruntime on the exported files, so tests compare Sluice's
answers against onnxruntime's own.
"""
import argparse
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")


def rename_outputs(model, mapping):
    for node in model.graph.node:
        node.output[:] = [mapping.get(o, o) for o in node.output]
    for out in model.graph.output:
        out.name = mapping.get(out.name, out.name)
    return model


def run(path, x):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input": x})))


def small():
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    scaler = StandardScaler().fit(x_train)
    xs_train = scaler.transform(x_train).astype(np.float32)
    classifiers = {
        "mlp": MLPClassifier(hidden_layer_sizes=(256, 256), max_iter=300, random_state=0),
        "logreg": LogisticRegression(max_iter=2000),
        "forest": RandomForestClassifier(n_estimators=50, max_depth=10, random_state=0),
    }
    types = [("input", FloatTensorType([None, 64]))]
    onx = convert_sklearn(scaler, initial_types=types, target_opset=17)
    onx = rename_outputs(onx, {onx.graph.output[0].name: "scaled"})
    onnx.save(onx, os.path.join(MODELS, "scaler.onnx"))
    for name, clf in classifiers.items():
        clf.fit(xs_train, y_train)
        onx = convert_sklearn(clf, initial_types=types, target_opset=17,
                              options={id(clf): {"zipmap": False}})
        outs = [o.name for o in onx.graph.output]
        onx = rename_outputs(onx, {outs[0]: "label", outs[1]: "probabilities"})
        onnx.save(onx, os.path.join(MODELS, f"{name}.onnx"))
        acc = (clf.predict(scaler.transform(x_test).astype(np.float32)) == y_test).mean()
        print(f"{name}: test accuracy {acc:.3f}")

    # Samples: raw test digits, their scaled form, and onnxruntime's outputs for each model.
    raw = x_test[:16]
    scaled = run(os.path.join(MODELS, "scaler.onnx"), raw)["scaled"]
    samples = {"labels": y_test[:16].tolist(), "raw": raw.tolist(), "scaled": scaled.tolist(),
               "expected": {"scaler": {"scaled": scaled.tolist()}}}
    for name in classifiers:
        out = run(os.path.join(MODELS, f"{name}.onnx"), scaled)
        samples["expected"][name] = {k: v.tolist() for k, v in out.items()}
    with open(os.path.join(HERE, "samples.json"), "w") as f:
        json.dump(samples, f)
    print("wrote samples.json")


def heavy():
    rng = np.random.default_rng(0)
    dims = [64, 2048, 2048, 2048, 10]
    nodes, inits = [], []
    cur = "input"
    for i in range(len(dims) - 1):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        b = (rng.standard_normal(dims[i + 1]) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"mm{i}"]))
        last = i == len(dims) - 2
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], ["logits" if last else f"z{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"h{i}"]))
            cur = f"h{i}"
    graph = helper.make_graph(
        nodes, "heavy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = os.path.join(MODELS, "heavy.onnx")
    onnx.save(model, path)
    x = np.asarray(json.load(open(os.path.join(HERE, "samples.json")))["scaled"], dtype=np.float32)
    out = run(path, x)
    with open(os.path.join(MODELS, "heavy.expected.json"), "w") as f:
        json.dump({"logits": out["logits"].tolist()}, f)
    print("wrote heavy.onnx")


# Every Open Inference Protocol datatype, as ONNX names it.
ECHO_TYPES = {
    "bool": TensorProto.BOOL, "uint8": TensorProto.UINT8, "uint16": TensorProto.UINT16,
    "uint32": TensorProto.UINT32, "uint64": TensorProto.UINT64, "int8": TensorProto.INT8,
    "int16": TensorProto.INT16, "int32": TensorProto.INT32, "int64": TensorProto.INT64,
    "fp16": TensorProto.FLOAT16, "fp32": TensorProto.FLOAT, "fp64": TensorProto.DOUBLE,
    "bytes": TensorProto.STRING,
}


def echo():
    """`echo`: one Identity per datatype (t_<type> -> u_<type>, shape [batch, n]), so a value's
    trip through Sluice can be compared bit for bit with what was sent (examples/datatypes.toml)."""
    nodes, inputs, outputs = [], [], []
    for name, ty in ECHO_TYPES.items():
        inputs.append(helper.make_tensor_value_info(f"t_{name}", ty, ["batch", f"n_{name}"]))
        outputs.append(helper.make_tensor_value_info(f"u_{name}", ty, ["batch", f"n_{name}"]))
        nodes.append(helper.make_node("Identity", [f"t_{name}"], [f"u_{name}"]))
    graph = helper.make_graph(nodes, "echo", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(MODELS, "echo.onnx"))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="retrain and export the committed models")
    a = p.parse_args()
    os.makedirs(MODELS, exist_ok=True)
    if a.small or not os.path.exists(os.path.join(HERE, "samples.json")):
        small()
    if not os.path.exists(os.path.join(MODELS, "echo.onnx")):
        echo()
    heavy()
