#!/bin/sh
# Measures the agent's footprint: stripped binary size, RSS before any model,
# RSS serving the digits model (after 1000 requests, then idle) and idle CPU.
# Needs mosquitto and python3; uses target/release/outpost (cargo build --release)
# and target/debug/outpost-sim (or OUTPOST / OUTPOST_SIM).
# ONNX Runtime: OUTPOST_ONNXRUNTIME_LIBRARY=/path/libonnxruntime.so.X RUNTIME=onnxruntime
# (an agent built with the feature) serves digits on it; RUNTIME=tract or auto too.
set -eu
cd "$(dirname "$0")/.."
OUTPOST=${OUTPOST:-target/release/outpost}
SIM=${OUTPOST_SIM:-target/debug/outpost-sim}
WORK=$(mktemp -d)
PIDS=""
# (jobs -p lists nothing inside a trap's command substitution in dash: keep the PIDs.)
trap 'kill $PIDS 2>/dev/null || true; rm -rf "$WORK"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MQTT=$(port); REG=$(port); HTTP=$(port)

mosquitto -p "$MQTT" >/dev/null 2>&1 &
PIDS="$PIDS $!"
LIB=${OUTPOST_ONNXRUNTIME_LIBRARY:-}
"$SIM" register fixtures/digits-mlp.onnx --name digits --version 1 --registry "$WORK/registry" \
    --labels fixtures/labels.txt ${RUNTIME:+--runtime "$RUNTIME"} >/dev/null
python3 -m http.server -d "$WORK/registry" -b 127.0.0.1 "$REG" >/dev/null 2>&1 &
PIDS="$PIDS $!"
sleep 0.5
OUTPOST_LOG=warn "$OUTPOST" run --broker "mqtt://127.0.0.1:$MQTT" --device footprint \
    --data-dir "$WORK/data" --http-bind "127.0.0.1:$HTTP" ${LIB:+--set "runtime.onnxruntime_library=$LIB"} &
AGENT=$!
PIDS="$PIDS $AGENT"
sleep 2
rss() { awk '/VmRSS/ {print $2}' "/proc/$AGENT/status"; }
ticks() { awk '{print $14 + $15}' "/proc/$AGENT/stat"; }
echo "binary: $(stat -c %s "$OUTPOST") bytes ($(stat -c %s "$OUTPOST" | awk '{printf "%.2f MB, %.2f MiB", $1 / 1e6, $1 / 1048576}'))"
echo "rss, no model: $(rss) KiB"
"$SIM" deploy --broker "mqtt://127.0.0.1:$MQTT" --device footprint --model digits@1 \
    --registry-url "http://127.0.0.1:$REG" --wait | grep -o "[a-z]* serves ([^)]*)" || true
python3 - "$HTTP" <<'PY'
import http.client, json, sys
body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [3.0] * 64}]})
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for _ in range(1000):
    c.request("POST", "/v2/models/digits/infer", body, {"content-type": "application/json"})
    r = c.getresponse(); r.read(); assert r.status == 200, r.status
PY
sleep 2
echo "rss, serving digits after 1000 requests: $(rss) KiB"
before=$(ticks); sleep 10; after=$(ticks)
echo "idle CPU over 10 s: $((after - before)) ticks (1 tick = 10 ms)"
kill -TERM $AGENT; wait $AGENT && echo "SIGTERM: exit 0"
