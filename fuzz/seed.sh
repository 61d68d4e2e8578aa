#!/usr/bin/env bash
# Builds the fuzz corpora from the golden fixtures.
#
#   fuzz/seed.sh [FIXTURE_DIR]      (default: tests/fixtures/pg15)
#
# Splits every FIXTURE_DIR/*.stream (raw walsender byte stream after
# CopyBothResponse) into fuzz/corpus/{frame,pgoutput,envelope}/, plus a
# synthetic stream covering every frame and pgoutput message kind. Seeds are
# named by SHA-1, so re-running only adds what is new; inputs the fuzzer has
# added to the corpora are left alone.
set -euo pipefail

fuzz_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$fuzz_dir")
fixtures=${1:-$root/tests/fixtures/pg15}
corpus=$fuzz_dir/corpus

mkdir -p "$corpus"/{frame,pgoutput,envelope}

synthetic=$(mktemp --suffix=.stream)
trap 'rm -f "$synthetic"' EXIT
python3 "$fuzz_dir/split_fixtures.py" synth "$synthetic"

shopt -s nullglob
streams=("$fixtures"/*.stream)
if ((${#streams[@]} == 0)); then
    echo "seed.sh: no $fixtures/*.stream yet; seeding from the synthetic stream only" >&2
fi
python3 "$fuzz_dir/split_fixtures.py" split "$corpus" "$synthetic" "${streams[@]}"
