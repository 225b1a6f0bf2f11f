#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole offline CPU test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -rs tests "$@"  # -rs: every skip says why
