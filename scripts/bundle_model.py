"""Choose decoding settings on the dev split, then ship a trained run as the bundled model.

    python scripts/bundle_model.py --model runs/flickr8k/best --work-dir work/flickr8k

Dev only: beam size and length penalty are picked by dev CIDEr-D; the test split is not looked
at here. The model is written in fp16 to src/captioner/pretrained/flickr8k with its
generation_config.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path

import torch

from captioner.api import Captioner
from captioner.evaluation.evaluate import evaluate
from captioner.model.captioning_model import CaptioningModel

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "src" / "captioner" / "pretrained" / "flickr8k"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="trained model directory (runs/.../best)")
    parser.add_argument("--work-dir", default="work/flickr8k", help="prepared Flickr8k")
    parser.add_argument("--beams", default="3,5", help="beam sizes to try on dev")
    parser.add_argument("--penalties", default="0.5,1.0,1.5", help="length penalties to try")
    parser.add_argument("--out", default=str(TARGET), help="where the bundled model goes")
    args = parser.parse_args()

    captioner = Captioner.from_pretrained(args.model)
    trials = []
    for beam, penalty in itertools.product(
        [int(b) for b in args.beams.split(",")], [float(p) for p in args.penalties.split(",")]
    ):
        report = evaluate(
            captioner,
            args.work_dir,
            split="val",
            beam_size=beam,
            length_penalty=penalty,
            use_java=False,
            progress=False,
            out_dir=Path(args.model).parent / "dev_sweep",
        )
        scores = report["scores"]
        print(
            f"dev beam {beam} lp {penalty}: BLEU-4 {scores['BLEU-4']:.2f} "
            f"CIDEr-D {scores['CIDEr-D']:.2f}",
            flush=True,
        )
        trials.append((scores["CIDEr-D"], beam, penalty, scores))
    best_cider, beam, penalty, dev_scores = max(trials, key=lambda t: (t[0], -t[1]))
    print(f"chosen on dev: beam {beam}, length penalty {penalty} (CIDEr-D {best_cider:.2f})")

    model = CaptioningModel.from_pretrained(args.model)
    model.generation.update(beam_size=beam, length_penalty=penalty)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    config = json.loads((Path(args.model) / "config.json").read_text())
    extra = {
        **config.get("extra", {}),
        "dev_selection": {
            "beam_size": beam,
            "length_penalty": penalty,
            "dev_scores": dev_scores,
            "trials": [
                {"beam_size": b, "length_penalty": p, "CIDEr-D": c} for c, b, p, _ in trials
            ],
        },
    }
    model.save_pretrained(out, dtype=torch.float16, extra=extra)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
