"""captioner: small, fast image captioning (EfficientNet-Lite + Show-Attend-Tell).

from captioner import Captioner
result = Captioner.from_pretrained().caption("photo.jpg")[0]
print(result.caption)
"""

from __future__ import annotations

import os

# On a small shared CPU, OpenMP threads that spin while waiting starve every other process (and
# each other): measured here, two concurrent trainings ran 2x faster in total with PASSIVE.
# Set before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["Captioner", "CaptionResult", "__version__"]


def __getattr__(name: str):
    # lazy: `import captioner` stays cheap (no torch) until the API is used
    if name in ("Captioner", "CaptionResult"):
        from captioner import api

        return getattr(api, name)
    raise AttributeError(name)
