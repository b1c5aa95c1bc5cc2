#!/usr/bin/env bash
# Builds the Debian packages `rekeyd` (with the `rekey` CLI) and `rekey-agent`
# into OUT_DIR (default: TARGET/debian). Usage:
#   scripts/build-debs.sh [--no-build] [--fast] [PROFILE] [OUT_DIR]
# PROFILE is a cargo profile (default: release; `dev` packages the debug
# binaries the test suite builds). --no-build packages binaries already built;
# --fast compresses less (the package test uses it).
# Needs cargo-deb (`cargo install --locked cargo-deb`).
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
deb_flags=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0 ;;
        --fast) deb_flags+=(--fast) ;;
        *) break ;;
    esac
    shift
done
profile=${1:-release}
target=${CARGO_TARGET_DIR:-target}
case "$profile" in
    dev | debug) profile=dev products="$target/debug" ;;
    *) products="$target/$profile" ;;
esac
out=${2:-$target/debian}
if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-debs: cargo-deb is not installed: cargo install --locked cargo-deb" >&2
    exit 3
fi
if [ "$build" = 1 ]; then
    cargo build --profile "$profile" -p rekey-coordinator -p rekey-agent -p rekey-cli --bins
fi
# Man pages and completions come from the binaries themselves (their clap
# definitions), into the products dir where the package metadata expects them.
gen="$products/pkg"
rm -rf "$gen"
mkdir -p "$gen/completions/bash" "$gen/completions/zsh" "$gen/completions/fish"
for bin in rekeyd rekey rekey-agent; do
    "$products/$bin" man --out "$gen/man/$bin" >/dev/null
    "$products/$bin" completions bash >"$gen/completions/bash/$bin"
    "$products/$bin" completions zsh >"$gen/completions/zsh/_$bin"
    "$products/$bin" completions fish >"$gen/completions/fish/$bin.fish"
done
mkdir -p "$out"
for pkg in rekey-coordinator rekey-agent; do
    cargo deb --no-build "${deb_flags[@]}" --profile "$profile" -p "$pkg" -o "$out" 2> >(grep -v "dev profile is not supported\|debug symbols set\|^\s*To enable" >&2)
done
