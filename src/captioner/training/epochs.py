"""The end of an epoch, shared by `train` and `scst`: free-running dev validation, metrics.csv
and curves.png, the best model, the weights kept for averaging, and where a run stands."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from captioner.io import atomic_write_text
from captioner.model.captioning_model import CaptioningModel
from captioner.model.decoder import ShowAttendTellDecoder
from captioner.training.averaging import save_epoch_weights
from captioner.training.feature_store import TrainingFeatures
from captioner.training.guards import check_finite_weights, drop_stale_grounding


def validate(
    decoder,
    features: torch.Tensor,
    names: list[str],
    captions: dict,
    vocab,
    max_length: int,
    batch_size: int = 200,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Free-running greedy decoding of dev images, scored against their references.
    ``features`` is (N, P, C): a tensor, or a RowSet read slice by slice."""
    from captioner.decoding import greedy_decode
    from captioner.evaluation.metrics import score_captions

    decoder.eval()
    predictions = {}
    with torch.inference_mode():
        for start in range(0, len(names), batch_size):
            batch = features[start : start + batch_size].to(device or "cpu").float()
            for name, result in zip(
                names[start : start + batch_size],
                greedy_decode(decoder, batch, max_length=max_length),
            ):
                predictions[name] = vocab.decode(result.token_ids)
    decoder.train()
    scores = score_captions({n: captions[n] for n in names}, predictions, use_java=False)
    return {"BLEU-4": scores["BLEU-4"], "CIDEr-D": scores["CIDEr-D"]}


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]) if history else ["epoch"])
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())
    if history:
        from captioner.viz.curves import plot_training_curves

        plot_training_curves(history, run_dir / "curves.png")


class EpochRecorder:
    """The end of an epoch, for `train` and `scst` alike: free-running dev validation, a
    metrics.csv row and curves.png, the best model saved to best/, the weights kept for
    averaging, and the patience count."""

    def __init__(
        self,
        run_dir: Path,
        decoder: ShowAttendTellDecoder,
        vocab,
        spec,
        features: TrainingFeatures,
        captions: dict,
        *,
        select_metric: str,
        keep_epochs: int,
        val_max_length: int,
        extra: dict,
        log=print,
        device: torch.device | None = None,
    ):
        self.run_dir, self.decoder, self.vocab, self.spec = run_dir, decoder, vocab, spec
        self.features, self.captions = features, captions
        self.select_metric, self.keep_epochs = select_metric, keep_epochs
        self.val_max_length, self.extra, self.log = val_max_length, extra, log
        self.device = device

    def end_epoch(self, state: dict, epoch: int, train_column: tuple[str, float], lr: float):
        """Validate and record epoch ``epoch`` (0-based) in ``state``; True if it is the best."""
        f = self.features
        scores = validate(
            self.decoder,
            f.val,
            f.val_names,
            self.captions,
            self.vocab,
            self.val_max_length,
            device=self.device,
        )
        name, value = train_column
        row = {
            "epoch": epoch + 1,
            "step": state["step"],
            name: round(value, 4),
            "val_BLEU-4": round(scores["BLEU-4"], 2),
            "val_CIDEr-D": round(scores["CIDEr-D"], 2),
            "lr": f"{lr:.2e}",
            "seconds": round(state["seconds"], 1),
        }
        state["history"].append(row)
        best = state["best"]
        improved = best is None or scores[self.select_metric] > best["value"]
        if improved:
            state["best"] = {
                "epoch": epoch + 1,
                "value": scores[self.select_metric],
                "metric": self.select_metric,
            }
            state["bad_epochs"] = 0
            check_finite_weights(self.decoder.state_dict(), f"{self.run_dir / 'best'}")
            drop_stale_grounding(self.run_dir / "best", self.log)
            CaptioningModel(self.decoder, self.vocab, self.spec).save_pretrained(
                self.run_dir / "best",
                extra={"dev": {**scores, "epoch": epoch + 1}, **self.extra},
            )
        else:
            state["bad_epochs"] += 1
        write_metrics(self.run_dir, state["history"])
        save_epoch_weights(self.run_dir, epoch + 1, self.decoder, self.keep_epochs)
        self.log(
            f"epoch {epoch + 1}: {name.replace('_', ' ')} {row[name]:.3f}  "
            f"dev BLEU-4 {row['val_BLEU-4']:.2f}"
            f"  CIDEr-D {row['val_CIDEr-D']:.2f}" + ("  (best)" if improved else "")
        )
        return improved


def new_progress() -> dict:
    """Where a run stands; checkpoints save it (minus the step, which names them) as JSON."""
    return {
        "epoch": 0,  # epochs finished
        "batch": 0,  # batches finished in the current epoch
        "step": 0,  # optimizer steps in all
        "history": [],  # metrics.csv rows
        "best": None,  # {"epoch", "value", "metric"} of the best dev score so far
        "bad_epochs": 0,  # epochs since it last improved
        "seconds": 0.0,  # training time, validation excluded
        # the epoch's train column (loss or reward) so far, so that a resumed epoch's mean
        # covers the batches before the interruption too
        "train_sum": 0.0,
        "train_count": 0,
    }


class EpochLines:
    """Progress inside an epoch where no bar shows (stderr is a log file or a pipe): a line at
    each tenth of the epoch, so a long epoch is not minutes of silence. Silent beside a bar."""

    PARTS = 10

    def __init__(self, desc: str, total: int, bar_shown: bool, log=print):
        self.desc, self.total, self.log = desc, total, log
        self.every = 0 if bar_shown else max(1, -(-total // self.PARTS))  # ceil: <= 9 lines

    def batch_done(self, b: int, what: str) -> None:
        """After batch ``b`` (0-based): a line when it ends a tenth (not the last batch: the
        epoch's own summary follows it)."""
        if self.every and (b + 1) % self.every == 0 and b + 1 < self.total:
            self.log(f"{self.desc}: batch {b + 1}/{self.total}, {what}")
