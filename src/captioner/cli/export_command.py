"""`captioner export`: the ONNX files for inference, checked against PyTorch."""

from __future__ import annotations

from pathlib import Path

import typer

from captioner.cli.common import MODEL_HELP, friendly_errors
from captioner.features.quantize import DEFAULT_CALIBRATION_IMAGES
from captioner.settings import check_choice, check_folder_option

# of int8 and fp32 grids on the calibration photos: 300 Flickr8k ones give 0.985, a dozen
# synthetic ones 0.94; a broken quantisation is far below
MIN_INT8_CORRELATION = 0.9


def _err(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


@friendly_errors
def export_cmd(
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    out_dir: Path = typer.Option(
        Path("onnx"), "--out-dir", "-o", help="folder for the .onnx files"
    ),
    tolerance: float = typer.Option(
        1e-3,
        min=0.0,
        max=1.0,
        help="largest accepted ONNX-vs-PyTorch difference, relative to the output scale",
    ),
    precision: str = typer.Option(
        "fp32",
        help="encoder precision: fp32, or int8 (static quantisation, calibrated on photos; "
        "also becomes the int8 encoder that --precision int8 elsewhere loads)",
    ),
    calibration_dir: Path | None = typer.Option(
        None,
        "--calibration-dir",
        help="int8: folder of calibration photos (training photos, never test ones); searched "
        "recursively",
    ),
    calibration_list: Path | None = typer.Option(
        None,
        "--calibration-list",
        help="int8: only these images of --calibration-dir (one name per line, e.g. "
        "Flickr_8k.trainImages.txt)",
    ),
    calibration_images: int = typer.Option(
        DEFAULT_CALIBRATION_IMAGES,
        min=1,
        max=10_000,
        help="int8: how many calibration photos, spread evenly over the sorted names",
    ),
) -> None:
    """Export encoder.onnx, decoder_start.onnx, decoder_step.onnx and check them against PyTorch."""
    from captioner.api import resolve_model_path
    from captioner.errors import ConfigError
    from captioner.model.captioning_model import CaptioningModel

    check_folder_option(out_dir, "--out-dir")
    if not tolerance > 0:
        raise ConfigError(f"--tolerance must be greater than 0, not {tolerance!r}")
    check_choice("--precision", precision, ("fp32", "int8"))
    if precision == "fp32" and (calibration_dir or calibration_list):
        raise ConfigError("--calibration-dir/--calibration-list are for --precision int8")
    if calibration_list is not None and calibration_dir is None:
        raise ConfigError("--calibration-list names images of --calibration-dir: give both")

    captioning_model = CaptioningModel.from_pretrained(resolve_model_path(model))
    if captioning_model.members:
        raise ConfigError(
            f"{model} is an ensemble of {len(captioning_model.decoders)} decoders; export writes "
            "one decoder's graphs: export each member's own model directory instead"
        )
    encoder_file, calibration = None, None
    if precision == "int8":
        encoder_file, calibration = _int8_encoder(
            captioning_model.encoder.name, calibration_dir, calibration_list, calibration_images
        )
    if encoder_file is not None and calibration is not None:
        from captioner.features.quantize import agreement, set_default

        check = agreement(captioning_model.encoder.name, encoder_file, calibration.images[:16])
        typer.echo(
            f"int8 vs fp32 encoder on {min(16, len(calibration.images))} calibration photos: "
            f"correlation {check['correlation']:.4f}, relative error "
            f"{check['relative_error']:.3f}, same top-1 concept {check['top1_agreement']:.0%}"
        )
        if check["correlation"] < MIN_INT8_CORRELATION:
            _err(f"the int8 encoder is far from fp32 (correlation below {MIN_INT8_CORRELATION})")
            raise typer.Exit(1)
        set_default(captioning_model.encoder.name, encoder_file)  # only once it checks out
    files = export_onnx(captioning_model, out_dir, encoder_file)
    for path in files:
        typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    parity = check_parity(captioning_model, out_dir)
    encoder_part = (
        f"encoder max abs diff {parity['encoder']:.2e} (scale {parity['encoder_scale']:.2f}), "
        if encoder_file is None
        else "encoder int8 (checked above), "
    )
    typer.echo(
        f"parity on one synthetic image: {encoder_part}decoder logits {parity['logits']:.2e} "
        f"(scale {parity['logits_scale']:.2f}), attention {parity['alpha']:.2e}"
    )
    typer.echo(
        f"greedy caption  torch: {parity['caption_torch']!r}\n"
        f"                 onnx: {parity['caption_onnx']!r}"
    )
    checked = ("encoder", "logits") if encoder_file is None else ("logits",)
    bad = [k for k in checked if parity[k] > tolerance * max(1.0, parity[k + "_scale"])]
    if bad or parity["alpha"] > tolerance or parity["caption_torch"] != parity["caption_onnx"]:
        _err("the ONNX files do not match PyTorch within the tolerance")
        raise typer.Exit(1)
    typer.echo("parity ok")


def _int8_encoder(encoder: str, folder: Path | None, names: Path | None, limit: int):
    """(int8 file, its CalibrationSet or None): calibrated on ``folder``, or the existing default
    int8 encoder when no folder is given."""
    from captioner.errors import ConfigError
    from captioner.features.quantize import (
        calibration_from_dir,
        default_int8_encoder,
        quantize_encoder,
    )

    if folder is None:
        existing = default_int8_encoder(encoder)
        if existing is None:
            raise ConfigError(
                "--precision int8 needs --calibration-dir DIR the first time (DIR: a few "
                "hundred training photos)"
            )
        return existing, None
    calibration = calibration_from_dir(folder, limit, names)
    typer.echo(f"calibrating the int8 encoder on {len(calibration.names)} photos of {folder}")
    return quantize_encoder(encoder, calibration, make_default=False), calibration


def export_onnx(model, out_dir: Path, encoder_file: Path | None = None) -> list[Path]:
    """Write encoder.onnx, decoder_start.onnx and decoder_step.onnx into ``out_dir``.

    ``encoder_file`` replaces the cached fp32 encoder export (the int8 one). All three are
    produced in a temporary folder inside ``out_dir`` and then moved into place,
    so an interrupted export never leaves a mix of old and new files.
    """
    import os
    import shutil
    import tempfile

    from captioner.features.onnx import export_encoder
    from captioner.model.onnx_decoder import export_decoder

    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["encoder.onnx", "decoder_start.onnx", "decoder_step.onnx"]
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp_name:
        tmp = Path(tmp_name)
        # the encoder is fixed pretrained weights: reuse the export cached for inference
        encoder = encoder_file or export_encoder(model.encoder.name)
        shutil.copyfile(encoder, tmp / "encoder.onnx")
        export_decoder(model.decoder, tmp)
        for name in names:
            os.replace(tmp / name, out_dir / name)
    return [out_dir / name for name in names]


def check_parity(model, onnx_dir: Path, steps: int = 8) -> dict:
    """Run PyTorch and the exported ONNX files on one synthetic image; return the differences."""
    import numpy as np
    import torch

    from captioner.decoding import greedy_decode
    from captioner.features.encoders import build_encoder, preprocess
    from captioner.features.onnx import ort_session
    from captioner.model.onnx_decoder import OrtStepper

    rng = np.random.default_rng(0)
    image = rng.integers(
        0, 256, size=(model.encoder.image_size, model.encoder.image_size, 3), dtype=np.uint8
    )
    batch = preprocess([image], model.encoder)  # (1, 3, S, S) float32
    with torch.inference_mode():
        feats_torch = build_encoder(model.encoder.name)(torch.from_numpy(batch)).numpy()
    feats_onnx = ort_session(onnx_dir / "encoder.onnx").run(None, {"images": batch})[0]
    features = torch.from_numpy(feats_torch)  # (1, P, C): both decoders read the same grid

    torch_stepper = model.decoder
    onnx_stepper = OrtStepper(onnx_dir, model.decoder.config.cell)
    logits_diff = alpha_diff = logits_scale = 0.0
    with torch.inference_mode():
        memory_t, state_t = torch_stepper.start(features)
        memory_o, state_o = onnx_stepper.start(features)
        tokens = torch.full((1,), model.vocab.start_id, dtype=torch.long)
        for _ in range(steps):
            logits_t, state_t, alpha_t = torch_stepper.step(tokens, state_t, memory_t)
            logits_o, state_o, alpha_o = onnx_stepper.step(tokens, state_o, memory_o)
            logits_diff = max(logits_diff, float((logits_t - logits_o).abs().max()))
            alpha_diff = max(alpha_diff, float((alpha_t - alpha_o).abs().max()))
            logits_scale = max(logits_scale, float(logits_t.abs().max()))
            tokens = logits_t.argmax(dim=1)  # teacher-force both with torch's choice
        ids = dict(
            start_id=model.vocab.start_id,
            end_id=model.vocab.end_id,
            unk_id=model.vocab.unk_id,
            pad_id=model.vocab.pad_id,
        )
        captions = [
            model.vocab.decode(greedy_decode(s, features, max_length=20, **ids)[0].token_ids)
            for s in (torch_stepper, onnx_stepper)
        ]
    return {
        "encoder": float(np.abs(feats_torch - feats_onnx).max()),
        "encoder_scale": float(np.abs(feats_torch).max()),
        "logits": logits_diff,
        "logits_scale": logits_scale,
        "alpha": alpha_diff,
        "caption_torch": captions[0],
        "caption_onnx": captions[1],
    }
