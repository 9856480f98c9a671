#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/seeds/<target>/) from the
repository's own examples: golden protocol messages, fixture models, the
packaged configuration. Small on purpose; libFuzzer grows its working corpus
from them (fuzz/corpus/, not committed whole: see README.md)."""
import json, pathlib, struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "protocol" / "golden"
OUT = ROOT / "fuzz" / "seeds"


def put(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def main():
    for f in ["deployment.json", "deployment-signed.json", "undeploy-signed.json"]:
        put("desired", f, (GOLDEN / f).read_bytes())
    signed = json.loads((GOLDEN / "deployment-signed.json").read_text())
    signed["signatures"][0]["certificate"] = {
        "payloadType": "application/vnd.outpost.key-certificate+json",
        "payload": __import__("base64").b64encode((GOLDEN / "key-certificate.json").read_bytes()).decode(),
        "signatures": [{"sig": signed["signatures"][0]["sig"]}]}
    put("desired", "with-certificate.json", json.dumps(signed))
    put("desired", "empty", b"")

    manifest = (GOLDEN / "manifest.json").read_bytes()
    put("manifest", "manifest.json", manifest)
    m = json.loads(manifest)
    m["files"][0]["url"] = "https://cdn.example/digits/2/model.onnx?sig=1"
    m["files"][1]["path"] = "sub/dir/labels.txt"
    put("manifest", "with-url.json", json.dumps(m))

    row = [float(i % 17) for i in range(64)]
    request = {"id": "r-1", "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [row, row]}],
               "outputs": [{"name": "probabilities_top_k"}]}
    put("infer_json", "digits.json", json.dumps(request))
    put("infer_json", "golden.json", (GOLDEN / "infer-request.json").read_bytes())
    put("infer_json", "fp64-nested.json", json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP64", "data": [row]}]}))

    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    put("binary", "digits.bin", struct.pack("<I", len(header)) + header + struct.pack("<64f", *row))

    put("mqtt_request", "reply.json", json.dumps(dict(request, reply_to="outpost/replies/client/1")))
    put("mqtt_request", "deputy.json", json.dumps(dict(request, reply_to="outpost/devices/other/desired")))
    put("mqtt_request", "golden.json", (GOLDEN / "infer-request.json").read_bytes())

    toml = "\n".join(l[1:] if l.startswith("#") and "=" in l and not l.startswith("# ") else l
                     for l in (ROOT / "packaging" / "agent.toml").read_text().splitlines())
    put("config", "packaged.toml", toml.encode() + b"\xff" + b'[limits]\nworkers = 4\n[mqtt]\nbroker = "mqtts://u:p@h:8883"\n')
    put("config", "minimal.toml", b'device = "cam-17"\n[mqtt]\nbroker = "mqtt://127.0.0.1:1883"\n')

    line = json.dumps({"topic": "outpost/devices/cam-17/events", "payload": "{\"seq\": 1}"}) + "\n"
    answer = json.dumps({"topic": "outpost/replies/c/1", "payload": "{}", "correlation": [1, 2]}) + "\n"
    put("journal", "two.jsonl", line + answer)
    put("journal", "cut.jsonl", line + answer[: len(answer) // 2])

    for f in ["digits-mlp.onnx", "digits-cnn.onnx", "unsupported-op.onnx"]:
        put("model", f, (ROOT / "fixtures" / f).read_bytes())


if __name__ == "__main__":
    main()
