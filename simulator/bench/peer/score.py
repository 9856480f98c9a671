"""The seed workflow's serving pattern: an Azure ML scoring script with
init()/run(), the model run by onnxruntime. OUTPOST_BENCH_MODEL names the
ONNX file (the benchmark sets it)."""
import json
import os

import numpy as np
import onnxruntime as ort

session = None
input_name = None


def init():
    global session, input_name
    session = ort.InferenceSession(os.environ["OUTPOST_BENCH_MODEL"], providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name


def run(raw_data):
    data = np.asarray(json.loads(raw_data)["data"], dtype=np.float32)
    probabilities = session.run(None, {input_name: data})[0]
    return {"probabilities": probabilities.tolist()}
