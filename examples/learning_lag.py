#!/usr/bin/env python3
"""Feedback-to-weights lag of a learner under sustained feedback, the direct Kafka way: logs
predictions to <prefix>.<model>.predictions and their feedback to <prefix>.<model>.feedback at a
fixed rate (as a worker and callers would), and follows <prefix>.<model>.weights as a serving
replica does (fetch wait 50 ms). Each feedback event's lag is the time from its produce to the
first weights record whose version counts it. Prints the rate reached, then lag p50/p99.

  python examples/learning_lag.py [--brokers 127.0.0.1:9092] [--model sea] [--rate 2000] [--seconds 10]
"""
import argparse
import io
import json
import os
import random
import threading
import time
import uuid

import fastavro
from confluent_kafka import Consumer, Producer, TopicPartition

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMAS = os.path.join(HERE, "..", "schemas", "avro")


def load(name):
    with open(os.path.join(SCHEMAS, name)) as f:
        return fastavro.parse_schema(json.load(f))


def encoder(schema):
    header = b"\xc3\x01" + bytes.fromhex(
        fastavro.schema.fingerprint(fastavro.schema.to_parsing_canonical_form(schema), "CRC-64-AVRO"))

    def encode(record):
        buf = io.BytesIO()
        buf.write(header)
        fastavro.schemaless_writer(buf, schema, record)
        return buf.getvalue()
    return encode


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", default="127.0.0.1:9092")
    ap.add_argument("--prefix", default="sluice")
    ap.add_argument("--model", default="sea")
    ap.add_argument("--rate", type=float, default=2000, help="feedback events per second")
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    pred, fb = encoder(load("prediction.avsc")), encoder(load("feedback.avsc"))
    topics = {k: f"{a.prefix}.{a.model}.{k}" for k in ("predictions", "feedback", "weights")}

    # Follow the weights from their end, as a replica does.
    follower = Consumer({"bootstrap.servers": a.brokers, "group.id": f"lag-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    _, high = follower.get_watermark_offsets(TopicPartition(topics["weights"], 0), timeout=10)
    follower.assign([TopicPartition(topics["weights"], 0, high)])
    seen = []  # (received at, version)
    stop = threading.Event()

    def follow():
        while not stop.is_set():
            m = follower.poll(0.1)
            if m is not None and not m.error():
                seen.append((time.time(), json.loads(m.value())["weights"]["version"]))

    t = threading.Thread(target=follow)
    t.start()
    time.sleep(1)
    start_version = seen[-1][1] if seen else None

    producer = Producer({"bootstrap.servers": a.brokers, "linger.ms": 2, "acks": "all"})
    rng = random.Random(1)
    sent = []  # feedback produce times, in order
    begin = time.time()
    n = int(a.rate * a.seconds)
    for i in range(n):
        due = begin + i / a.rate
        now = time.time()
        if due > now:
            time.sleep(due - now)
        x = [rng.uniform(0, 10) for _ in range(3)]
        rid = f"lag-{i}-{uuid.uuid4().hex[:8]}"
        ms = int(time.time() * 1000)
        producer.produce(topics["predictions"], key=rid, value=pred(
            {"id": rid, "model": a.model, "weights_version": 0, "features": x, "probability": 0.5, "time_ms": ms, "arm": None}))
        producer.produce(topics["feedback"], key=rid, value=fb(
            {"id": rid, "model": a.model, "truth": float(x[0] + x[1] > 7), "reward": None, "time_ms": ms}))
        sent.append(time.time())
        if i % 500 == 0:
            producer.poll(0)
    producer.flush(30)
    took = time.time() - begin
    # Wait for the last event to be counted.
    base = start_version or 0
    end = time.time() + 15
    while time.time() < end and not (seen and seen[-1][1] >= base + n):
        time.sleep(0.05)
    stop.set()
    t.join()
    lags, k = [], 0
    for i, at in enumerate(sent):
        while k < len(seen) and seen[k][1] < base + i + 1:
            k += 1
        if k == len(seen):
            break
        lags.append(seen[k][0] - at)
    print(f"feedback sent: {n} in {took:.1f} s ({n / took:.0f}/s); counted in weights: {len(lags)}; "
          f"snapshots seen: {len(seen)}")
    print(f"feedback -> weights lag: p50 {1000 * percentile(lags, 0.5):.0f} ms, "
          f"p99 {1000 * percentile(lags, 0.99):.0f} ms, max {1000 * max(lags or [float('nan')]):.0f} ms")


if __name__ == "__main__":
    main()
