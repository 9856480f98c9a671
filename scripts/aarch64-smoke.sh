#!/bin/sh
# Cross-builds the agent for aarch64-unknown-linux-gnu and runs end-to-end
# tests against it under qemu-user: real Mosquitto, registry and operator
# (native), the ARM agent emulated. Needs (Debian):
#   rustup target add aarch64-unknown-linux-gnu
#   apt-get install -y gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user mosquitto
# PROFILE=release builds the size-tuned release binary instead (slower to build).
set -eu
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
PROFILE=${PROFILE:-dev}
if [ "$PROFILE" = release ]; then DIR=release; FLAG=--release; else DIR=debug; FLAG=; fi

start=$(date +%s)
cargo build $FLAG --target $TARGET -p outpost-agent --bin outpost
echo "aarch64 build ($PROFILE): $(( $(date +%s) - start )) s"
BIN="$PWD/target/$TARGET/$DIR/outpost"
file "$BIN" 2>/dev/null || true
ls -l "$BIN"

# The tests start the agent through this wrapper.
WRAPPER="$PWD/target/outpost-aarch64-qemu"
# OUTPOST_SELF_EXE: the agent starts its isolated model validation through
# the wrapper too (qemu-user cannot execute /proc/self/exe of an ARM binary).
# The validation runs with an empty environment: qemu by its full path.
QEMU=$(command -v qemu-aarch64)
cat > "$WRAPPER" <<WRAP
#!/bin/sh
export OUTPOST_SELF_EXE="$WRAPPER"
QEMU_LD_PREFIX=/usr/aarch64-linux-gnu exec "$QEMU" "$BIN" "\$@"
WRAP
chmod +x "$WRAPPER"
"$WRAPPER" --version

# The native side (tests, outpost-sim), then a deploy-and-infer subset with the ARM agent.
cargo build -p outpost-sim
start=$(date +%s)
OUTPOST_AGENT_BIN="$WRAPPER" cargo test -p outpost-tests --test e2e -- \
    a_deploy_message_becomes_served_predictions_and_versions_swap \
    the_local_http_endpoint_speaks_open_inference_protocol_v2 \
    every_bad_bundle_fails_precisely_and_the_serving_model_keeps_answering \
    after_a_power_cut_the_device_serves_from_its_store_without_the_registry
echo "aarch64 e2e under qemu: $(( $(date +%s) - start )) s"
