"""captioner: small, fast image captioning (EfficientNet-Lite + Show-Attend-Tell).

from captioner import Captioner
result = Captioner.from_pretrained().caption("photo.jpg")[0]
print(result.caption)
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Captioner", "CaptionResult", "__version__"]


def __getattr__(name: str):
    # lazy: `import captioner` stays cheap (no torch) until the API is used
    if name in ("Captioner", "CaptionResult"):
        from captioner import api

        return getattr(api, name)
    raise AttributeError(name)
