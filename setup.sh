#!/usr/bin/env bash
# One command: create .venv, install Nectar with its export and dev extras, pull the default
# model, and answer a first question with it. Safe to re-run (every step is idempotent).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch is pinned first (2.13.0): pip takes the CPU wheel where its index offers one (as on this
# workplace's machines); an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,dev]"
nectar pull smollm2-135m-instruct
nectar generate --chat "What is the capital of France?" --max-new-tokens 16
