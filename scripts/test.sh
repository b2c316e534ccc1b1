#!/usr/bin/env bash
# Sets up and runs the whole test suite (lint included). The README's second command.
#
# Installs the locked dependency set (requirements/lock.txt) into .venv, so this tests exactly
# what a fresh machine installs; scripts/test-latest.sh runs the same with the newest releases.
#
# The suite runs on three servers: the embedded PostgreSQL 18 (every tier), then PostgreSQL 12
# ("pg12", AnalyticDB 7.0's PostgreSQL) and PostgreSQL 12 without the jsonb catalog entries
# AnalyticDB 6.0 lacks ("gp6"): there, only the tests that reach the server (conftest.py) and
# no e2e test (the browser and benchmark tests exercise no SQL of their own).
# ENRICH_TEST_SERVERS="pg18" (for example) picks fewer. The older servers' passes run side by side
# after the PostgreSQL 18 pass. Every pass runs even when another failed, and the script fails at
# the end naming the passes that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
venv="${ENRICH_VENV:-.venv}"
# The UI test drives Debian's Chromium through Playwright (never `playwright install`).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
    $apt_get update -qq && DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq chromium >/dev/null \
        || { echo "error: could not install Debian's chromium (needed by the UI test)" >&2; exit 1; }
fi
python3 -m venv "$venv" || exit 1
if [ "${ENRICH_DEPS:-locked}" = latest ]; then
    "$venv/bin/pip" install -q --upgrade --upgrade-strategy eager -e '.[test]' || exit 1
else
    "$venv/bin/pip" install -q -c requirements/lock.txt -e '.[test]' || exit 1
fi
failed=()
"$venv/bin/ruff" check . || failed+=("ruff")
older=()
for server in ${ENRICH_TEST_SERVERS:-pg18 pg12 gp6}; do
    if [ "$server" = pg18 ]; then
        echo "== tests on ${server}"
        ENRICH_TEST_SERVER=pg18 "$venv/bin/pytest" -q "$@" || failed+=("$server")
    else
        older+=("$server")
    fi
done
# The older servers' passes run side by side: each has its own server (the binaries' cache and
# the system user are taken under file locks), and their tests wait on servers and processes
# more than they compute, so two at once take little longer than one. Each pass's output is
# printed whole when it ends. Job control (set -m) gives them default signal dispositions: without
# it a background job starts with SIGINT ignored, which the processes the signal tests start
# would inherit.
if [ ${#older[@]} -gt 0 ]; then
    logs="$(mktemp -d)"
    pids=()
    set -m
    for server in "${older[@]}"; do
        ENRICH_TEST_SERVER="$server" "$venv/bin/pytest" -q -p no:cacheprovider -m "not e2e" "$@" \
            >"$logs/$server.log" 2>&1 &
        pids+=("$!")
    done
    for i in "${!older[@]}"; do
        wait "${pids[$i]}"
        status=$?
        echo "== tests on ${older[$i]}"
        cat "$logs/${older[$i]}.log"
        [ "$status" = 0 ] || failed+=("${older[$i]}")
    done
    set +m
    rm -rf "$logs"
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all passes green: ruff ${ENRICH_TEST_SERVERS:-pg18 pg12 gp6}"
