#!/usr/bin/env bash
# The whole suite against the newest releases pyproject.toml allows, ignoring the lock, in a
# virtual environment of its own (.venv-latest), so that a dependency release that would break
# a fresh install is seen here before users see it. Green: refresh the lock (scripts/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ENRICH_DEPS=latest ENRICH_VENV=.venv-latest exec bash scripts/test.sh "$@"
