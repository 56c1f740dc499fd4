#!/usr/bin/env python3
"""Calls a Sluice model or graph straight through Kafka, with no gateway: produce an Avro request
to its request topic (a graph's entry topic), read the answer from its result topic.

  pip install fastavro confluent-kafka
  python examples/kafka_direct.py [--brokers 127.0.0.1:9092] [--model mlp]
  python examples/kafka_direct.py --model digits-pipeline      # a graph: raw pixels in
  python examples/kafka_direct.py --model digits-pipeline --json   # OIP JSON both ways, no Avro

Records use Avro single-object encoding: C3 01, the 8-byte little-endian CRC-64-AVRO fingerprint
of the writer schema, then the Avro binary datum (schemas/avro/*.avsc).
"""
import argparse
import io
import json
import os
import struct
import time
import uuid

import fastavro
from confluent_kafka import Consumer, Producer

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMAS = os.path.join(HERE, "..", "schemas", "avro")


def load(name):
    with open(os.path.join(SCHEMAS, name)) as f:
        return fastavro.parse_schema(json.load(f))


def fingerprint(schema):
    # fastavro computes the Rabin (CRC-64-AVRO) fingerprint of the parsing canonical form.
    return fastavro.schema.fingerprint(fastavro.schema.to_parsing_canonical_form(schema), "CRC-64-AVRO")


def encode(schema, record):
    buf = io.BytesIO()
    buf.write(b"\xc3\x01" + bytes.fromhex(fingerprint(schema)))
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def decode(schema, data):
    assert data[:2] == b"\xc3\x01", "not a single-object record"
    return fastavro.schemaless_reader(io.BytesIO(data[10:]), schema)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--brokers", default="127.0.0.1:9092")
    p.add_argument("--model", default="mlp")
    p.add_argument("--input", choices=["raw", "scaled"],
                   help="sample features (default: raw for the digits-* graphs and scaler, else scaled)")
    p.add_argument("--json", action="store_true",
                   help="send an Open Inference Protocol JSON body (content-type: application/json); "
                        "the answer comes back as JSON")
    a = p.parse_args()
    kind = a.input or ("raw" if a.model.startswith("digits-") or a.model == "scaler" else "scaled")
    request_schema, result_schema = load("request.avsc"), load("result.avsc")
    sample = json.load(open(os.path.join(HERE, "samples.json")))
    x = sample[kind][0]
    rid = f"py-{uuid.uuid4()}"
    now_us = int(time.time() * 1e6)
    request = {
        "id": rid, "client_id": None, "model": a.model,
        "deadline_ms": now_us // 1000 + 30_000, "sent_at_us": now_us, "reply": None,
        "trace": {}, "parameters": {}, "outputs": [],
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                    "data": struct.pack(f"<{len(x)}f", *x)}],
    }
    consumer = Consumer({"bootstrap.servers": a.brokers, "group.id": f"py-{uuid.uuid4()}",
                         "auto.offset.reset": "latest"})
    consumer.subscribe([f"sluice.{a.model}.results"])
    consumer.poll(2.0)  # join the group before producing
    producer = Producer({"bootstrap.servers": a.brokers})
    if a.json:
        body = {"id": rid, "parameters": {"timeout": 30_000_000},
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x}]}
        producer.produce(f"sluice.{a.model}.requests", key=rid, value=json.dumps(body),
                         headers=[("content-type", "application/json")])
    else:
        producer.produce(f"sluice.{a.model}.requests", key=rid, value=encode(request_schema, request))
    producer.flush(10)
    deadline = time.time() + 30
    while time.time() < deadline:
        msg = consumer.poll(1.0)
        if msg is None or msg.error() or msg.key() != rid.encode():
            continue
        if a.json:
            answer = json.loads(msg.value())
            if "error" in answer:
                raise SystemExit(f"error: {answer}")
            for t in answer["outputs"]:
                print(t["name"], t["shape"], [round(v, 4) for v in t["data"]])
            return
        result = decode(result_schema, msg.value())
        if result["error"]:
            raise SystemExit(f"error: {result['error']}")
        for t in result["outputs"]:
            fmt = {"INT64": "q", "FP32": "f"}[t["datatype"]]
            values = struct.unpack(f"<{len(t['data']) // struct.calcsize(fmt)}{fmt}", t["data"])
            print(t["name"], t["shape"], [round(v, 4) for v in values])
        return
    raise SystemExit("no result within 30 s")


if __name__ == "__main__":
    main()
