#!/usr/bin/env python3
"""Writes the `digits-images` example's inputs: each of examples/samples.json's 16 raw digit rows
(8x8, values 0-16) as an 8-bit grayscale PNG (pixel = value x 15), plus the labels the numeric
pipeline answers for them. Checks with Pillow that each PNG decodes back to value x 15 exactly,
so the graph's `decode_image` step (divide = 15) must give the numeric pipeline's inputs.

  .venv/bin/python examples/make_digit_images.py
"""
import json
import os

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "images")


def main():
    os.makedirs(OUT, exist_ok=True)
    samples = json.load(open(os.path.join(HERE, "samples.json")))
    raw = np.asarray(samples["raw"], dtype=np.float64)
    for i, row in enumerate(raw):
        pixels = (row.reshape(8, 8) * 15).astype(np.uint8)
        path = os.path.join(OUT, f"digit-{i:02d}.png")
        Image.fromarray(pixels, mode="L").save(path, optimize=True)
        back = np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 15
        assert np.array_equal(back.reshape(-1), row), f"{path} does not decode to its row"
    json.dump({"files": [f"digit-{i:02d}.png" for i in range(len(raw))],
               "label": samples["expected"]["mlp"]["label"],
               "pixels": raw.tolist()},
              open(os.path.join(OUT, "expected.json"), "w"))
    print(f"wrote {len(raw)} PNGs to {OUT}; Pillow decodes each to its digits row")


if __name__ == "__main__":
    main()
