#!/bin/sh
# Runs every fuzz target for SECONDS (default 600) and prints a Markdown
# table: executions, coverage (libFuzzer's cov / ft), corpus size, findings.
#   cd fuzz && ./run-all.sh 600 [JOBS]
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
# The working corpus grows in corpus/<target> (seeded from seeds/<target>);
# findings land in artifacts/<target>. The model target runs with
# -ignore_ooms: a model that allocates past the limit is what the agent's
# isolated validation refuses (resource_limit), not a finding here; each OOM
# is counted in the table all the same.
set -eu
cd "$(dirname "$0")"
secs=${1:-600}
jobs=${2:-1}
# TARGETS="a b" runs only those; TABLE_ONLY=1 prints the table of the last runs.
targets=${TARGETS:-$(cargo +nightly fuzz list)}
mkdir -p logs
run() {
    t=$1
    mkdir -p "corpus/$t" "artifacts/$t"
    extra=""
    [ "$t" = model ] && extra="-fork=1 -ignore_ooms=1 -ignore_timeouts=1 -rss_limit_mb=3072"
    # shellcheck disable=SC2086
    cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -print_final_stats=1 \
        -timeout=20 -rss_limit_mb=3072 $extra > "logs/$t.log" 2>&1 || true
}
n=0
[ -n "${TABLE_ONLY:-}" ] && targets_to_run="" || targets_to_run=$targets
for t in $targets_to_run; do
    run "$t" &
    n=$((n + 1))
    if [ "$n" -ge "$jobs" ]; then wait; n=0; fi
done
wait
echo "| target | executions | exec/s | coverage (cov / ft) | corpus | crashes | ooms | timeouts |"
echo "|---|---|---|---|---|---|---|---|"
for t in ${TABLE_TARGETS:-$(cargo +nightly fuzz list)}; do
    log="logs/$t.log"
    execs=$(grep -ao 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | awk '{print $2}')
    # Fork mode (the model target) prints "#N: cov: ... oom/timeout/crash: a/b/c" instead.
    [ -z "$execs" ] && execs=$(grep -ao '^#[0-9]*' "$log" | tail -1 | tr -d '#')
    speed=$(grep -ao 'stat::average_exec_per_sec: [0-9]*' "$log" | tail -1 | awk '{print $2}')
    [ -z "$speed" ] && speed=$(grep -ao 'exec/s: [0-9]*' "$log" | tail -1 | awk '{print $2}')
    cov=$(grep -ao 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 | awk '{print $2 " / " $4}')
    corpus=$(ls "corpus/$t" | wc -l)
    crashes=$(ls "artifacts/$t" 2>/dev/null | grep -ac '^crash-' || true)
    ooms=$(grep -ao 'oom/timeout/crash: [0-9]*' "$log" | tail -1 | awk '{print $2}')
    [ -z "$ooms" ] && ooms=$(grep -ac 'out-of-memory' "$log" || true)
    timeouts=$(ls "artifacts/$t" 2>/dev/null | grep -ac '^timeout-' || true)
    echo "| $t | ${execs:-?} | ${speed:-?} | ${cov:-?} | $corpus | $crashes | $ooms | $timeouts |"
done
