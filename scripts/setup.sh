#!/usr/bin/env bash
# Create .venv (if missing), install the pinned requirements (the lock CI installs) into it, then the package
# itself in editable mode (pyproject.toml): `clif` and the five scripts import from anywhere, no sys.path edits.
# pip installs without byte-compiling every file (--no-compile); scripts/warm_bytecode.py then compiles what the
# project imports (half a minute less on 2 cores, even where PYTHONDONTWRITEBYTECODE is set).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --no-compile -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-compile --no-deps -e .
stamp="$(sha256sum requirements.txt scripts/warm_bytecode.py)"  # warm again when either changes
if [ "$(cat .venv/.bytecode-warm 2>/dev/null)" != "$stamp" ]; then
  PYTHONDONTWRITEBYTECODE= HF_HUB_OFFLINE=1 .venv/bin/python scripts/warm_bytecode.py
  echo "$stamp" > .venv/.bytecode-warm
fi
