"""Choose a model and its decoding settings on the dev split, then ship it as the bundled model.

    python scripts/bundle_model.py --model runs/flickr8k/best --model runs/flickr8k/avg3 \
        --work-dir work/flickr8k

Dev only: the candidate model (e.g. the best epoch or an average of the last epochs, see
`captioner average`), beam size and length penalty are picked by dev CIDEr-D (`--select cider`) or
by the sum of the four metrics the quality target names, BLEU-1 + BLEU-4 + METEOR + CIDEr-D
(`--select targets`, needs Java for METEOR); the test split is not looked at here. The model is
written in fp16 to src/captioner/pretrained/flickr8k with its generation_config.json.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
from pathlib import Path

import torch

from captioner.api import Captioner
from captioner.evaluation.evaluate import evaluate
from captioner.model.captioning_model import CaptioningModel

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "src" / "captioner" / "pretrained" / "flickr8k"
CRITERIA = {"cider": ("CIDEr-D",), "targets": ("BLEU-1", "BLEU-4", "METEOR", "CIDEr-D")}
SHOWN = CRITERIA["targets"]  # printed and stored for every trial, whatever the criterion


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        action="append",
        help="candidate model directory (runs/.../best); repeat to compare several on dev",
    )
    parser.add_argument("--work-dir", default="work/flickr8k", help="prepared Flickr8k")
    parser.add_argument("--beams", default="3,5", help="beam sizes to try on dev")
    parser.add_argument("--penalties", default="0.5,1.0,1.5", help="length penalties to try")
    parser.add_argument(
        "--no-repeat", default="0", help="no_repeat_ngram_size values to try (0 = off)"
    )
    parser.add_argument(
        "--select",
        choices=sorted(CRITERIA),
        default="cider",
        help="dev criterion: CIDEr-D alone, or BLEU-1 + BLEU-4 + METEOR + CIDEr-D",
    )
    parser.add_argument("--out", default=str(TARGET), help="where the bundled model goes")
    args = parser.parse_args()
    criterion = CRITERIA[args.select]

    trials = []
    for model_dir in args.model:
        captioner = Captioner.from_pretrained(model_dir)
        for beam, penalty, no_repeat in itertools.product(
            [int(b) for b in args.beams.split(",")],
            [float(p) for p in args.penalties.split(",")],
            [int(n) for n in args.no_repeat.split(",")],
        ):
            report = evaluate(
                captioner,
                args.work_dir,
                split="val",
                beam_size=beam,
                length_penalty=penalty,
                no_repeat_ngram_size=no_repeat,
                use_java="METEOR" in criterion,
                progress=False,
                out_dir=Path(model_dir) / "dev_sweep",
            )
            scores = report["scores"]
            missing = [m for m in criterion if m not in scores]
            if missing:
                raise SystemExit(f"dev scores lack {missing} (METEOR needs Java)")
            value = sum(scores[m] for m in criterion)
            shown = " ".join(f"{m} {scores[m]:.2f}" for m in SHOWN if m in scores)
            print(
                f"{model_dir}: dev beam {beam} lp {penalty} no-repeat {no_repeat}: {shown}",
                flush=True,
            )
            trials.append((value, model_dir, beam, penalty, no_repeat, scores))
    best_value, model_dir, beam, penalty, no_repeat, dev_scores = max(
        trials, key=lambda t: (t[0], -t[2])
    )
    print(
        f"chosen on dev: {model_dir}, beam {beam}, length penalty {penalty}, "
        f"no-repeat {no_repeat} ({' + '.join(criterion)} = {best_value:.2f})"
    )

    model = CaptioningModel.from_pretrained(model_dir)
    model.generation.update(beam_size=beam, length_penalty=penalty, no_repeat_ngram_size=no_repeat)
    out = Path(args.out)
    staging = out.with_name(out.name + ".staging")  # the old bundle stays until the new is whole
    shutil.rmtree(staging, ignore_errors=True)
    extra = {
        **model.extra,
        "dev_selection": {
            "model": str(model_dir),
            "beam_size": beam,
            "length_penalty": penalty,
            "no_repeat_ngram_size": no_repeat,
            "criterion": list(criterion),
            "dev_scores": dev_scores,
            "trials": [
                {
                    "model": str(m),
                    "beam_size": b,
                    "length_penalty": p,
                    "no_repeat_ngram_size": n,
                    **{k: sc[k] for k in SHOWN if k in sc},
                }
                for _, m, b, p, n, sc in trials
            ],
        },
    }
    model.save_pretrained(staging, dtype=torch.float16, extra=extra)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
