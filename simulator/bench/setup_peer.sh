#!/bin/sh
# Sets up the peer `outpost-sim bench` compares against: Azure ML's inference
# server (azureml-inference-server-http, gunicorn + Flask) with a score.py that
# runs the same model with onnxruntime, in simulator/bench/.venv.
set -eu
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet azureml-inference-server-http onnxruntime numpy
.venv/bin/python -c "import azureml_inference_server_http, onnxruntime; print('peer ready:', onnxruntime.__version__)"
