#!/usr/bin/env bash
# The test suite: lint, format check, then every test (Flickr8k tests skip when ../shared is absent).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/ruff check src tests bench scripts
.venv/bin/ruff format --check src tests bench scripts
.venv/bin/python -m pytest -q -rs -p no:cacheprovider "$@"
