#!/usr/bin/env bash
# Install mtkit (editable, with the dev extra) into the active Python. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# A bare "torch" requirement with no torch installed pulls the multi-GB CUDA build from PyPI;
# pin the CPU build first so the range in pyproject.toml is already satisfied.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"

# The Explorer's tests drive a real browser: Debian's Chromium (Playwright cannot download its own
# here). Installed when this is a Debian machine and we may; elsewhere those tests skip, saying why.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
fi
"$PY" -c "import mtkit, torch; print(f'mtkit ready (torch {torch.__version__})')"
