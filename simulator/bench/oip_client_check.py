#!/usr/bin/env python3
"""Queries an Outpost agent's local HTTP port with Triton's own Python client
(tritonclient.http), as a team with existing Open Inference Protocol code would,
and checks the answers against onnxruntime's outputs from the fixtures.

    pip install "tritonclient[http]" numpy
    python3 simulator/bench/oip_client_check.py --url 127.0.0.1:8080 --model digits \
        --expected fixtures/digits-mlp-expected.json

Not part of the test suite (it needs the PyPI package); the e2e tests speak the
same protocol, binary extension included, from Rust.
"""
import argparse
import json
import os

import numpy as np
import tritonclient.http as httpclient

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "fixtures")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="127.0.0.1:8080")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--expected", default=os.path.join(FIXTURES, "digits-mlp-expected.json"))
    args = ap.parse_args()

    with open(os.path.join(FIXTURES, "digits-heldout.json")) as f:
        images = np.array(json.load(f)["images"], dtype=np.float32)
    with open(args.expected) as f:
        expected = np.array(json.load(f)["probabilities"], dtype=np.float32)

    client = httpclient.InferenceServerClient(url=args.url)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_model_metadata(args.model)
    print("metadata:", json.dumps(meta))
    server = client.get_server_metadata()
    print("server:", json.dumps(server))

    for binary in (True, False):
        inp = httpclient.InferInput("input", list(images.shape), "FP32")
        inp.set_data_from_numpy(images, binary_data=binary)
        outputs = None if binary else [httpclient.InferRequestedOutput("probabilities", binary_data=False)]
        result = client.infer(args.model, [inp], outputs=outputs)
        probs = result.as_numpy("probabilities")
        diff = float(np.abs(probs - expected).max())
        print(f"binary={binary}: {probs.shape[0]} digits, model_version "
              f"{result.get_response()['model_version']}, max |outpost - onnxruntime| = {diff:.2e}")
        assert diff < 1e-4
        if binary:
            top = result.as_numpy("probabilities_top_k")
            print("top-k labels of the first digit:", [t.decode() for t in top[0]])

    try:
        bad = httpclient.InferInput("pixels", [1, 64], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
        client.infer(args.model, [bad])
        raise SystemExit("a wrong input name was accepted")
    except httpclient.InferenceServerException as e:
        print("wrong input name ->", e)
    print("ok")


if __name__ == "__main__":
    main()
