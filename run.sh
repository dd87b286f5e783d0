#!/usr/bin/env bash
# The main job: set up, then caption a photo with the bundled Flickr8k model and draw where
# it looked for each word. Usage: bash run.sh [IMAGE]   (default: matplotlib's sample photo)
# One `captioner predict` call prints the caption and writes demo_attention.png, so the model
# is loaded once; setup.sh skips pip when .venv is already installed.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
# (found without importing matplotlib, which alone takes a second)
IMAGE=${1:-$(.venv/bin/python -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('matplotlib').submodule_search_locations[0], 'mpl-data', 'sample_data', 'grace_hopper.jpg'))")}
.venv/bin/captioner predict --image "$IMAGE" --out demo_attention.png
