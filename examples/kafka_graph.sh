#!/usr/bin/env bash
# Calls a graph through Kafka with kcat, no gateway and no Avro: an Open Inference Protocol JSON
# request (content-type: application/json) on the graph's entry topic; the JSON answer comes back
# on its result topic, keyed by the request id.
#   examples/kafka_graph.sh [GRAPH] [BROKERS]     (defaults: digits-pipeline 127.0.0.1:9092)
set -euo pipefail
cd "$(dirname "$0")"
graph=${1:-digits-pipeline}
brokers=${2:-127.0.0.1:9092}
id="kcat-$$-$RANDOM"
body=$(python3 -c 'import json,sys; r=json.load(open("requests/'"$graph"'.json")); r["id"]=sys.argv[1]; print(json.dumps(r))' "$id")
printf '%s\n' "$body" | kcat -P -b "$brokers" -t "sluice.$graph.requests" -k "$id" -H content-type=application/json
# Read the result topic until our id shows up (-e: stop at its end; retry while the graph works).
for _ in $(seq 1 50); do
  answer=$(kcat -C -b "$brokers" -t "sluice.$graph.results" -o beginning -e -q -f '%k\t%s\n' 2>/dev/null | awk -F'\t' -v id="$id" '$1 == id {print $2}')
  if [ -n "$answer" ]; then
    printf '%s\n' "$answer"
    exit 0
  fi
  sleep 0.2
done
echo "no answer for $id" >&2
exit 1
