"""Figures: normalization and augmentation previews, per-word attention overlays."""
