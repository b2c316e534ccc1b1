#!/usr/bin/env bash
# Refreshes requirements/lock.txt: the whole dependency set (runtime and test extra) resolved
# anew from pyproject.toml by uv. Both README commands install from the lock, so a fresh
# machine gets exactly the versions CI tested; run this, then scripts/test.sh, and commit both.
# `scripts/lock.sh --upgrade-package openai` moves one package; extra arguments go to uv.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
tools=".venv-tools"
[ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q uv; }
"$tools/bin/uv" pip compile pyproject.toml --extra test --python-version 3.11 --universal \
    --quiet -o requirements/lock.txt "$@"
echo "requirements/lock.txt refreshed; now run: bash scripts/test.sh"
