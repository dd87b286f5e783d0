"""`captioner evaluate`: decode every image of a split, score it, write a report.

Scores are computed only on decoded captions (beam search or greedy, exactly what users get),
never on teacher-forced outputs. The encoder features come from the feature cache when a
complete one exists for the model's encoder (view 0); otherwise the images are encoded here.
The cache holds fp32 features, so ``precision="int8"`` always encodes the images, with the int8
encoder (calibrated on the work dir's training split on first use, when there is none yet).

Two files are written atomically into ``out_dir``:
    report_<split>_beam<k>.json   settings, scores (0-100), timing
    results_<split>_beam<k>.json  COCO results format: [{"image_id": name, "caption": ...}]
(``..._beam<k>_int8.json`` for the int8 encoder.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from captioner.api import Captioner, resolve_model_path
from captioner.data.images import load_image
from captioner.data.prepare import PreparedData
from captioner.devices import resolve_device
from captioner.errors import ConfigError, DataError
from captioner.evaluation.metrics import java_available, score_captions
from captioner.features.quantize import DEFAULT_PRECISION, check_precision
from captioner.io import atomic_write_json, unwritable_reason
from captioner.progress import progress_bar

DEFAULT_EVAL_ROOT = Path("runs/eval")


def default_out_dir(model: str | os.PathLike | None) -> Path:
    """runs/eval/<model directory name> (the bundled model: runs/eval/flickr8k); a training
    run's ``best/`` is runs/eval/<run>-best, so the best models of two runs never share one."""
    path = resolve_model_path(model).resolve()
    name = f"{path.parent.name}-{path.name}" if path.name == "best" else path.name
    return DEFAULT_EVAL_ROOT / name


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``out_dir`` that cannot be written now, before the decoding, not after it
    (when every caption would be lost); see :func:`captioner.io.unwritable_reason`."""
    reason = unwritable_reason(out_dir, folder=True)
    if reason is not None:
        raise DataError(f"{out_dir}: {reason}")


def report_paths(
    out_dir: Path, split: str, beam_size: int, precision: str = "fp32"
) -> tuple[Path, Path]:
    stem = f"{split}_beam{beam_size}" + ("" if precision == "fp32" else f"_{precision}")
    return out_dir / f"report_{stem}.json", out_dir / f"results_{stem}.json"


def _cached_features(captioner: Captioner, prepared: PreparedData, names: list[str]):
    """(N, P, C) fp16 features of ``names`` from a complete view-0 cache, or None if none."""
    from captioner.features.cache import cache_dir_for, is_current
    from captioner.features.pipeline import (
        ensure_features,
        feature_root,
        load_features,
        split_images,
    )

    spec = captioner.spec
    cache_dir = cache_dir_for(feature_root(prepared), spec.name, spec.image_size, 0)
    if not is_current(cache_dir, prepared.image_source, split_images(prepared), spec):
        return None
    dirs = ensure_features(prepared, spec.name, progress=False)  # complete: loads no encoder
    cached_names, features = load_features({0: dirs[0]})[0]
    index = {name: i for i, name in enumerate(cached_names)}
    missing = [n for n in names if n not in index]
    if missing:
        return None
    return features.index_select(0, torch.tensor([index[n] for n in names], dtype=torch.long))


def _ensure_int8_encoder(model_path: Path, work_dir: str | os.PathLike) -> None:
    """No int8 encoder yet: calibrate one on the work dir's training photos (never test)."""
    from captioner.features.quantize import (
        calibration_from_prepared,
        default_int8_encoder,
        quantize_encoder,
    )
    from captioner.model.captioning_model import CaptioningModel

    encoder = CaptioningModel.from_pretrained(model_path).encoder.name
    if default_int8_encoder(encoder) is None:
        quantize_encoder(encoder, calibration_from_prepared(work_dir, "train"))


def evaluate(
    model: str | os.PathLike | Captioner | None,
    work_dir: str | os.PathLike,
    split: str = "test",
    beam_size: int | None = None,
    max_length: int | None = None,
    length_penalty: float | None = None,
    batch_size: int = 50,
    no_repeat_ngram_size: int | None = None,
    use_java: bool | None = None,
    limit: int = 0,
    *,
    out_dir: str | os.PathLike | None = None,
    backend: str = "auto",
    use_cache: bool = True,
    progress: bool = True,
    precision: str = DEFAULT_PRECISION,
    device: str = "cpu",
    grounding: bool = True,
) -> dict:
    """Caption every image of ``split`` of the prepared ``work_dir``, score, write, return report.

    ``model`` is a saved model directory, None for the bundled model, or a loaded Captioner.
    ``limit`` > 0 evaluates only the first ``limit`` images of the split (a quick check).
    ``use_java`` is passed to :func:`score_captions` (None: Java if available). ``out_dir``
    defaults to ``runs/eval/<model directory name>`` (``<run>-best`` for a training run's
    ``best/``, ``runs/eval/captioner`` for a Captioner); it is checked writable before decoding.
    ``grounding=False`` decodes a grounded model without its concept bias (an ablation).
    ``precision`` is the encoder's and ``device`` where encoder and decoder run ("cpu", "cuda"
    or "auto", see :class:`Captioner`); a loaded Captioner brings its own.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if limit < 0:
        raise ConfigError(f"limit must be 0 (all) or positive, got {limit}")
    check_precision(precision)
    if precision == "int8" and device == "auto":
        device = "cpu"  # int8 runs on ONNX Runtime, the CPU build (as in Captioner)
    if resolve_device(device).type != "cpu" and precision == "int8":  # before calibrating one
        raise ConfigError("the int8 encoder runs on ONNX Runtime (CPU): use --device cpu")
    start = time.perf_counter()
    if isinstance(model, Captioner):
        captioner, model_name = model, "captioner"
        out_dir = Path(out_dir) if out_dir is not None else DEFAULT_EVAL_ROOT / "captioner"
        check_out_dir(out_dir)
    else:
        model_path = resolve_model_path(model)
        model_name = str(model_path)
        out_dir = Path(out_dir) if out_dir is not None else default_out_dir(model_path)
        check_out_dir(out_dir)
        if precision == "int8":
            _ensure_int8_encoder(model_path, work_dir)
        captioner = Captioner.from_pretrained(
            model_path, backend=backend, precision=precision, device=device
        )
    precision = captioner.precision
    prepared = PreparedData.load(work_dir)
    names = list(prepared.splits[split])
    if limit:
        names = names[:limit]
    if not names:
        raise DataError(f"the {split} split of {work_dir} has no images")

    settings = captioner.generation_settings(  # None: the model's own decoding defaults
        beam_size=beam_size,
        max_length=max_length,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    beam_size, max_length = settings["beam_size"], settings["max_length"]
    length_penalty = settings["length_penalty"]
    no_repeat_ngram_size = settings["no_repeat_ngram_size"]
    cacheable = use_cache and precision == "fp32"  # the cache holds fp32 encoder output
    features = _cached_features(captioner, prepared, names) if cacheable else None
    options = dict(
        beam_size=beam_size,
        max_length=max_length,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        return_attention=False,
        grounding=grounding,
    )
    look = captioner.second_look if grounding else None

    def detector_inputs(batch: list[str]) -> dict:
        """The photos at the detector's size, so cached grids are captioned as ``caption``
        captions the images (the person/animal gate and short descriptions need them)."""
        if look is None or not look.wanted:
            return {}
        source = prepared.image_source
        return {"detector_images": look.thumbnails([load_image(source.locate(n)) for n in batch])}

    predictions: dict[str, str] = {}
    decode_start = time.perf_counter()
    batches = [names[i : i + batch_size] for i in range(0, len(names), batch_size)]
    bar = progress_bar(
        batches,
        unit="batch",
        disable=not progress,
        desc=f"evaluate {split} (beam {beam_size}, "
        f"{'cached features' if features is not None else 'encoding images'})",
    )
    offset = 0
    for batch in bar:
        if features is not None:
            chunk = features[offset : offset + len(batch)].float()  # (b, P, C)
            results = captioner.caption_features(chunk, **options, **detector_inputs(batch))
        else:
            source = prepared.image_source  # a folder, or tar shards read in place
            results = captioner.caption([source.locate(n) for n in batch], **options)
        offset += len(batch)
        predictions.update((n, r.caption) for n, r in zip(batch, results, strict=True))
    bar.close()
    decode_s = time.perf_counter() - decode_start

    references = {n: prepared.captions[n] for n in names}
    scores = score_captions(references, predictions, use_java=use_java)
    report_path, results_path = report_paths(out_dir, split, beam_size, precision)
    report = {
        "model": model_name,
        "work_dir": str(work_dir),
        "split": split,
        "n_images": len(names),
        "limit": limit,
        "beam_size": beam_size,
        "max_length": max_length,
        "length_penalty": length_penalty,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "encoder": captioner.spec.name,
        "backend": captioner.backend,
        # the concept bias's in-domain / out-of-domain strengths, or None (no grounding, or off)
        "grounding": (
            {
                "strength": captioner.grounder.config.strength,
                "ood_strength": captioner.grounder.config.ood_strength,
            }
            if captioner.grounder is not None and grounding
            else None
        ),
        "precision": precision,
        "device": str(captioner.device),
        # the ONNX file in use (None: PyTorch, which the GPU extractor has no attribute for)
        "encoder_file": getattr(getattr(captioner.extractor, "encoder_file", None), "name", None),
        "features": "cache" if features is not None else "encoded",
        "tokenizer": "java-ptb" if java_available() and use_java is not False else "python-ptb",
        "scores": scores,
        "scale": "0-100",
        "decode_s": round(decode_s, 3),
        "time_s": round(time.perf_counter() - start, 3),
        "results_file": str(results_path),
    }
    results = [{"image_id": n, "caption": predictions[n]} for n in names]
    try:
        atomic_write_json(results_path, results)
        atomic_write_json(report_path, report)
    except OSError as exc:  # disk full since the check: one line, not a traceback
        raise DataError(f"{out_dir}: cannot write the report ({exc.strerror or exc})") from exc
    report["report_file"] = str(report_path)
    return report
