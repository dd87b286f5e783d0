#!/usr/bin/env bash
# The main job: set up, then caption a photo with the bundled Flickr8k model and draw where
# it looked for each word. Usage: bash run.sh [IMAGE]   (default: matplotlib's sample photo)
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
IMAGE=${1:-$(.venv/bin/python -c "import matplotlib, os; print(os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data/sample_data/grace_hopper.jpg'))")}
.venv/bin/captioner caption "$IMAGE"
.venv/bin/captioner predict --image "$IMAGE" --out demo_attention.png
