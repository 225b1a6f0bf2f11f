#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole offline CPU test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One pytest worker per core (pytest-xdist), one torch thread each: the suite is mostly single-threaded Python,
# subprocess start-up and small tensors. The threads are pinned for every process a test starts too, so a test that
# compares an in-process run with a subprocess compares equal arithmetic.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# --maxschedchunk 1: a test at a time to each worker, the heavy ones first (tests/conftest.py: heavy_first), so that the
# workers end together. -rs: every skip says why; -n 0: one process.
exec .venv/bin/python -m pytest -q -rs -n auto --maxschedchunk 1 tests "$@"
