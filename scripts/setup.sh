#!/usr/bin/env bash
# Create .venv and install captioner with its test extras (idempotent: reuses an existing .venv).
# The pip steps are skipped when .venv was already installed for this pyproject.toml and torch
# pin (a stamp file in .venv holds their hash), so a second run.sh / test.sh starts in a second;
# any change to pyproject.toml reinstalls. CAPTIONER_REINSTALL=1 forces the pip steps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch pinned: an unpinned resolve would pull a multi-GB CUDA build
TORCH="torch==2.13.0"
STAMP=.venv/.captioner-installed
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
wanted=$(.venv/bin/python - "$TORCH" <<'EOF'
import hashlib, sys
digest = hashlib.sha256(open("pyproject.toml", "rb").read())
digest.update(sys.argv[1].encode())  # the torch pin
digest.update(sys.version.encode())  # a rebuilt venv on another Python
print(digest.hexdigest())
EOF
)
# the stamp alone is not trusted: the installed distributions must be there too
if [ "${CAPTIONER_REINSTALL:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ] \
  && .venv/bin/python -c "import importlib.metadata as m; m.version('captioner'); m.version('torch')" \
    2>/dev/null; then
  exit 0
fi
rm -f "$STAMP"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH"
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "$wanted" >"$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
