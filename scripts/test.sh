#!/usr/bin/env bash
# Sets up and runs the whole test suite (lint included). The README's second command.
#
# The suite runs on three servers: the embedded PostgreSQL 18 (every tier), then PostgreSQL 12
# ("pg12", AnalyticDB 7.0's PostgreSQL) and PostgreSQL 12 without the jsonb catalog entries
# AnalyticDB 6.0 lacks ("gp6"): there, only the tests that reach the server (conftest.py) and
# no e2e test (the browser and benchmark tests exercise no SQL of their own).
# ENRICH_TEST_SERVERS="pg18" (for example) picks fewer.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The UI test drives Debian's Chromium through Playwright (never `playwright install`).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
    $apt_get update -qq
    DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq chromium >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
.venv/bin/ruff check .
for server in ${ENRICH_TEST_SERVERS:-pg18 pg12 gp6}; do
    echo "== tests on ${server}"
    if [ "$server" = pg18 ]; then
        ENRICH_TEST_SERVER=pg18 .venv/bin/pytest -q "$@"
    else
        ENRICH_TEST_SERVER="$server" .venv/bin/pytest -q -m "not e2e" "$@"
    fi
done
