"""Starts Azure ML's inference server (azmlinfsrv) bound to 127.0.0.1: its
bind address is hard-coded to 0.0.0.0, so this sets it before the server
reads it. Arguments are azmlinfsrv's (--entry_script, --port, ...)."""
import sys

import azureml_inference_server_http.amlserver as amlserver

amlserver.DEFAULT_HOST = "127.0.0.1"
sys.argv[0] = "azmlinfsrv"
sys.exit(amlserver.run())
