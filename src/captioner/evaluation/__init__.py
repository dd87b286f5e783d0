"""Evaluation: standard COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D) via pycocoevalcap."""
