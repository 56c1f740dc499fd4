#!/usr/bin/env python3
"""Sends the example digit PNGs to the `digits-images` graph with stock tritonclient (BYTES,
binary tensor extension) and prints the labels next to the numeric pipeline's.

  .venv-triton/bin/python examples/digits_images.py [HOST:PORT]
"""
import json
import os
import sys

import numpy as np
import tritonclient.http as httpclient

HERE = os.path.dirname(os.path.abspath(__file__))
url = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8000"
expected = json.load(open(os.path.join(HERE, "images", "expected.json")))
images = [open(os.path.join(HERE, "images", f), "rb").read() for f in expected["files"]]
client = httpclient.InferenceServerClient(url=url)
inp = httpclient.InferInput("image", [len(images)], "BYTES")
inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
res = client.infer("digits-images", [inp])
labels = res.as_numpy("label").tolist()
print("labels from PNGs:   ", labels)
print("numeric pipeline:   ", expected["label"])
sys.exit(0 if labels == expected["label"] else 1)
