#!/bin/sh
# Signs an Outpost desired state with openssl alone (a CI pipeline needs
# nothing of ours) and prints the DSSE envelope to publish, retained, on the
# desired topic.
#
#   scripts/sign-deployment.sh KEY.pem PAYLOAD.json [PAYLOAD_TYPE] > envelope.json
#   mosquitto_pub -h BROKER -q 1 -r -t outpost/devices/cam-17/desired -f envelope.json
#
# KEY.pem: an ed25519 private key (openssl genpkey -algorithm ed25519 -out KEY.pem).
# PAYLOAD.json: the deployment, with "target": {"device": "cam-17"} (or
# {"group": ...}) naming the topic it goes to. PAYLOAD_TYPE defaults to a
# deployment; application/vnd.outpost.undeploy+json signs an undeployment
# ({"schema": "outpost.undeploy.v1", "revision": N, "target": {...}}).
#
# What is signed is DSSE v1's PAE: "DSSEv1 <len(type)> <type> <len(body)> <body>".
set -eu
key=$1
payload=$2
type=${3:-application/vnd.outpost.deployment+json}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
len=$(wc -c < "$payload" | tr -d ' ')
printf 'DSSEv1 %d %s %d ' "${#type}" "$type" "$len" > "$tmp/pae"
cat "$payload" >> "$tmp/pae"
openssl pkeyutl -sign -inkey "$key" -rawin -in "$tmp/pae" -out "$tmp/sig"
sig=$(openssl base64 -A -in "$tmp/sig")
body=$(openssl base64 -A -in "$payload")
printf '{"payloadType":"%s","payload":"%s","signatures":[{"sig":"%s"}]}\n' "$type" "$body" "$sig"
