"""`captioner export`: the ONNX files for inference, checked against PyTorch."""

from __future__ import annotations

from pathlib import Path

import typer

from captioner.cli.common import MODEL_HELP, friendly_errors


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
) -> None:
    """Export encoder.onnx, decoder_start.onnx, decoder_step.onnx and check them against PyTorch."""
    from captioner.api import resolve_model_path
    from captioner.errors import ConfigError
    from captioner.model.captioning_model import CaptioningModel

    if not tolerance > 0:
        raise ConfigError(f"--tolerance must be greater than 0, not {tolerance!r}")

    captioning_model = CaptioningModel.from_pretrained(resolve_model_path(model))
    files = export_onnx(captioning_model, out_dir)
    for path in files:
        typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    parity = check_parity(captioning_model, out_dir)
    typer.echo(
        f"parity on one synthetic image: encoder max abs diff {parity['encoder']:.2e} "
        f"(scale {parity['encoder_scale']:.2f}), decoder logits {parity['logits']:.2e} "
        f"(scale {parity['logits_scale']:.2f}), attention {parity['alpha']:.2e}"
    )
    typer.echo(
        f"greedy caption  torch: {parity['caption_torch']!r}\n"
        f"                 onnx: {parity['caption_onnx']!r}"
    )
    bad = [
        k for k in ("encoder", "logits") if parity[k] > tolerance * max(1.0, parity[k + "_scale"])
    ]
    if bad or parity["alpha"] > tolerance or parity["caption_torch"] != parity["caption_onnx"]:
        _err("the ONNX files do not match PyTorch within the tolerance")
        raise typer.Exit(1)
    typer.echo("parity ok")


def export_onnx(model, out_dir: Path) -> list[Path]:
    """Write encoder.onnx, decoder_start.onnx and decoder_step.onnx into ``out_dir``.

    All three are produced in a temporary folder inside ``out_dir`` and then moved into place,
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
        shutil.copyfile(export_encoder(model.encoder.name), tmp / "encoder.onnx")
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
