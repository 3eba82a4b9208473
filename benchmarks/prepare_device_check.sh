#!/usr/bin/env bash
# Prepares what benchmarks/device_check.py needs on the device machine, which has no network and sees only this
# repository's working tree plus the ignored folders a `run` call carries (docs/benchmarks.md, Device check):
#   .device_check/fixtures/  the tiny_a goldens from ../shared (6.6 MB; ../shared does not travel)
#   .whl/                    pure-Python wheels the device image lacks: websockets (faster_vla.serving) and
#                            openpi-client (the serving section's client), for CPython 3.12 on x86-64 Linux
# Run from anywhere; SHARED overrides the shared folder (default: the repository's ../shared).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
shared="${SHARED:-$repo/../shared}"
src="$shared/fixtures/openpi_pi05"
files=(tiny_a_params.npz tiny_a_inputs.npz tiny_a_outputs_float32.npz tiny_a_outputs_bfloat16.npz)
for f in "${files[@]}"; do
    [ -f "$src/$f" ] || { echo "error: $src/$f not found (set SHARED to the folder holding fixtures/openpi_pi05)" >&2; exit 1; }
done
mkdir -p "$repo/.device_check/fixtures" "$repo/.whl"
for f in "${files[@]}"; do cp "$src/$f" "$repo/.device_check/fixtures/"; done
# Versions from today's stack (constraints/today.txt): what CI tests on jax 0.11.2 / numpy 2.
websockets="$(grep -i '^websockets==' "$repo/constraints/today.txt")"
pip="${PIP:-python3 -m pip}"
$pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$repo/.whl" "$websockets" openpi-client==0.1.2
echo "prepared:"; du -sh "$repo/.device_check" "$repo/.whl"; ls "$repo/.whl"
echo "carried tree (tracked + untracked files git does not ignore, + the two folders):"
( cd "$repo" && { git ls-files -co --exclude-standard -z | du -ch --files0-from=- | tail -1; du -sh .device_check .whl; } )
