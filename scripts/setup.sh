#!/usr/bin/env bash
# Create .venv (if missing), install the pinned requirements (the lock CI installs) into it, then the package
# itself in editable mode (pyproject.toml): `clif` and the five scripts import from anywhere, no sys.path edits.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
