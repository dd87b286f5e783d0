"""Training: resume after SIGKILL matches an uninterrupted run, shapes are learned, DDP syncs."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captioner.data.synthetic import COLOURS, SHAPES, make_shapes_dataset
from captioner.errors import ConfigError
from captioner.training.checkpoint import (
    list_checkpoints,
    resume_latest,
    save_checkpoint,
    start_over,
)
from captioner.training.config import TrainConfig
from captioner.training.loop import get_lr, train

SMALL = dict(
    num_words=0,
    min_count=1,
    embed_dim=32,
    hidden_dim=48,
    attention_dim=32,
    context_dim=32,
    dropout=0.2,
    batch_size=20,
    lr=3e-3,
    warmup_steps=4,
    threads=1,
    val_images=8,
    patience=0,
)


def _cli_args(cfg: TrainConfig) -> list[str]:
    args = []
    for key, value in cfg.to_json().items():
        if value is None:
            continue
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir / "checkpoints")[-1] / "model.safetensors"))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("resume-data"), num_images=40, seed=3)


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    lrs = [get_lr(s, 100, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4)
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[100] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_rerun_with_other_settings_is_refused(small_data, tmp_path):
    cfg = TrainConfig(
        data_dir=str(small_data),
        work_dir=str(tmp_path / "w"),
        run_dir=str(tmp_path / "r"),
        epochs=1,
        max_steps=2,
        **SMALL,
    )
    train(cfg)
    other = TrainConfig(**{**cfg.to_json(), "hidden_dim": 64})
    with pytest.raises(ConfigError, match="hidden_dim"):
        train(other)
    saved = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert saved["hidden_dim"] == 48  # the refused run changed nothing


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_weights(small_data, tmp_path):
    common = dict(
        data_dir=str(small_data),
        work_dir=str(tmp_path / "work"),
        epochs=3,
        checkpoint_every=2,
        **SMALL,
    )
    reference = TrainConfig(run_dir=str(tmp_path / "uninterrupted"), **common)
    train(reference)

    killed = TrainConfig(run_dir=str(tmp_path / "killed"), **common)
    cmd = [sys.executable, "-m", "captioner", "train", *_cli_args(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = Path(killed.run_dir) / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(ckpts)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_at_kill = int(list_checkpoints(ckpts)[-1].name.split("_")[1])
    total_steps = int(list_checkpoints(Path(reference.run_dir) / "checkpoints")[-1].name[5:])
    assert 0 < steps_at_kill < total_steps

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = _final_weights(Path(reference.run_dir)), _final_weights(Path(killed.run_dir))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    history = (Path(killed.run_dir) / "metrics.csv").read_text().splitlines()
    assert len(history) == 1 + 3  # header + one row per epoch, none lost or repeated


def test_corrupt_latest_checkpoint_falls_back_to_previous(small_data, tmp_path):
    cfg = TrainConfig(
        data_dir=str(small_data),
        work_dir=str(tmp_path / "w"),
        run_dir=str(tmp_path / "r"),
        epochs=1,
        max_steps=4,
        checkpoint_every=2,
        keep_last=5,
        **SMALL,
    )
    train(cfg)
    ckpts = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert len(ckpts) >= 2
    (ckpts[-1] / "model.safetensors").write_bytes(b"garbage")
    messages: list[str] = []
    cfg2 = TrainConfig(**{**cfg.to_json(), "max_steps": 6})
    train(cfg2, log=messages.append)
    assert any("damaged" in m for m in messages)
    assert any(f"resumed from {ckpts[-2]}" in m for m in messages)


@pytest.mark.slow
def test_shapes_model_learns_colours_and_shapes(tmp_path):
    """A real accuracy check on held-out images: name both the colour and the shape."""
    from captioner.api import Captioner
    from captioner.data.prepare import PreparedData

    data = make_shapes_dataset(tmp_path / "shapes", num_images=240, seed=0, objects=1)
    cfg = TrainConfig(
        data_dir=str(data),
        work_dir=str(tmp_path / "w"),
        run_dir=str(tmp_path / "r"),
        num_words=0,
        min_count=1,
        embed_dim=64,
        hidden_dim=128,
        attention_dim=64,
        context_dim=64,
        dropout=0.1,
        epochs=12,
        batch_size=50,
        lr=3e-3,
        warmup_steps=10,
        threads=2,
        patience=0,
    )
    best = train(cfg)
    prepared = PreparedData.load(cfg.work_dir)
    names = prepared.splits.test
    results = Captioner.from_pretrained(best).caption([prepared.images_dir / n for n in names])
    pattern = re.compile(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})")
    truth = [pattern.findall(prepared.captions[n][0])[0] for n in names]
    said = [pattern.findall(r.caption) for r in results]
    both = sum([t] == s for t, s in zip(truth, said)) / len(names)
    shape = sum(bool(s) and s[0][1] == t[1] for t, s in zip(truth, said)) / len(names)
    # chance is 1/12 for both and 1/3 for the shape; deep ImageNet features encode shape far
    # better than flat colour, hence the different bars
    assert shape >= 0.8, (shape, list(zip(truth, said)))
    assert both >= 0.4, (both, list(zip(truth, said)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_stay_in_sync(small_data, tmp_path):
    cfg = TrainConfig(
        data_dir=str(small_data),
        work_dir=str(tmp_path / "w"),
        run_dir=str(tmp_path / "r"),
        epochs=2,
        **{**SMALL, "threads": 1},
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "captioner",
        "train",
        *_cli_args(cfg),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = json.loads((tmp_path / "r" / "ranks.json").read_text())
    assert ranks["world_size"] == 2
    assert ranks["weight_checksums"][0] == ranks["weight_checksums"][1]
    assert (tmp_path / "r" / "best" / "model.safetensors").is_file()
    assert "2 processes" in proc.stdout


def test_epoch_weights_are_kept_and_averaged(small_data, tmp_path):
    from captioner.model.captioning_model import CaptioningModel
    from captioner.training.averaging import average_run, list_epoch_weights

    run_dir = tmp_path / "r"
    cfg = TrainConfig(
        data_dir=str(small_data),
        work_dir=str(tmp_path / "w"),
        run_dir=str(run_dir),
        epochs=3,
        keep_epochs=2,
        **SMALL,
    )
    train(cfg)
    kept = list_epoch_weights(run_dir)
    assert sorted(kept) == [2, 3]  # epoch 1 was dropped once epoch 3 arrived
    a, b = load_file(str(kept[2])), load_file(str(kept[3]))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # training moved the weights

    # a resumed run may extend --epochs after best/ was saved: provenance takes the final value
    settings = json.loads((run_dir / "train_config.json").read_text())
    (run_dir / "train_config.json").write_text(json.dumps({**settings, "epochs": 4}))
    out = average_run(run_dir, tmp_path / "avg", last=2)
    model = CaptioningModel.from_pretrained(out)
    assert model.extra["train_config"]["epochs"] == 4
    for key, value in model.decoder.state_dict().items():
        torch.testing.assert_close(value, (a[key] + b[key]) / 2, msg=key)
    config = json.loads((out / "config.json").read_text())
    assert config["extra"]["averaged_epochs"] == [2, 3]

    with pytest.raises(ConfigError, match=r"epochs \[1\] are not kept"):
        average_run(run_dir, tmp_path / "avg2", epochs=[1, 2])
    assert not (tmp_path / "avg2").exists()  # a refused request writes nothing


# ---- checkpoint bookkeeping: damaged, stale and superseded checkpoints ----------------------
def _tiny_optimised(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # so the optimizer has state to save
    return model, optimizer


def test_all_checkpoints_damaged_warns_and_keeps_the_new_ones(tmp_path):
    root = tmp_path / "checkpoints"
    model, optimizer = _tiny_optimised(0)
    for step in (4, 6):
        save_checkpoint(root, step, model, optimizer, {"epoch": 0}, keep_last=3)
    (root / "step_00000004" / "model.safetensors").write_bytes(b"garbage")
    # the newest one fits partly: its weights load, then its optimizer state fails
    state = json.loads((root / "step_00000006" / "state.json").read_text())
    (root / "step_00000006" / "state.json").write_text(json.dumps({**state, "optimizer": {}}))

    fresh, fresh_opt = _tiny_optimised(1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    messages: list[str] = []
    assert resume_latest(root, fresh, fresh_opt, log=messages.append) is None
    assert any("STARTS FROM SCRATCH" in m for m in messages), messages
    assert list_checkpoints(root) == []  # both set aside, not deleted
    assert sorted(p.name for p in (root / "damaged").iterdir()) == [
        "step_00000004",
        "step_00000006",
    ]
    for key, value in fresh.state_dict().items():  # nothing of the damaged ones was kept
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)

    # the new run's checkpoints are numbered below the damaged ones: they must survive pruning
    save_checkpoint(root, 2, fresh, fresh_opt, {"epoch": 0}, keep_last=1)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]
    save_checkpoint(root, 3, fresh, fresh_opt, {"epoch": 0}, keep_last=1)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000003"]
    assert resume_latest(root, *_tiny_optimised(2), log=messages.append)["step"] == 3


def test_default_log_sends_the_from_scratch_warning_to_stderr(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    model, optimizer = _tiny_optimised(0)
    save_checkpoint(root, 1, model, optimizer, {"epoch": 0})
    (root / "step_00000001" / "optimizer.safetensors").write_bytes(b"")
    assert resume_latest(root, model, optimizer) is None
    captured = capsys.readouterr()
    assert "STARTS FROM SCRATCH" in captured.err and "damaged" in captured.err


def test_checkpoints_of_an_abandoned_run_do_not_push_out_new_ones(tmp_path):
    root = tmp_path / "checkpoints"
    model, optimizer = _tiny_optimised(0)
    save_checkpoint(root, 10, model, optimizer, {"epoch": 2})
    messages: list[str] = []
    start_over(root, log=messages.append)  # --restart
    assert list_checkpoints(root) == [] and (root / "superseded" / "step_00000010").is_dir()
    save_checkpoint(root, 10, model, optimizer, {"epoch": 1})
    save_checkpoint(root, 20, model, optimizer, {"epoch": 3})
    start_over(root, log=messages.append)  # a second restart does not overwrite the first
    assert sorted(p.name for p in (root / "superseded").iterdir()) == [
        "step_00000010",
        "step_00000010.1",
        "step_00000020",
    ]
    # a later-numbered checkpoint that is still in place (here put back by hand) is set aside
    # when an earlier step is written, instead of deleting the new checkpoint
    (root / "superseded" / "step_00000020").rename(root / "step_00000020")
    save_checkpoint(root, 2, model, optimizer, {"epoch": 0}, keep_last=1)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]
    assert (root / "superseded" / "step_00000020").is_dir()


def test_half_written_checkpoints_of_dead_processes_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    stale = root / f".tmp_step_00000004_{dead_pid}"
    live = root / f".tmp_step_00000004_{os.getppid()}"  # pytest's parent is alive
    for path in (stale, live):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"half")
    model, optimizer = _tiny_optimised(0)
    assert resume_latest(root, model, optimizer, log=lambda m: None) is None
    assert not stale.exists() and live.is_dir()
    save_checkpoint(root, 2, model, optimizer, {"epoch": 0})
    assert live.is_dir() and [p.name for p in list_checkpoints(root)] == ["step_00000002"]


def test_resumed_epoch_reports_the_whole_epochs_loss_and_a_moved_run_resumes(small_data, tmp_path):
    common = dict(data_dir=str(small_data), epochs=1, checkpoint_every=2, keep_last=10, **SMALL)
    straight = TrainConfig(work_dir=str(tmp_path / "w"), run_dir=str(tmp_path / "r"), **common)
    train(straight, log=lambda m: None)
    ckpts = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert len(ckpts) >= 2  # one inside the epoch, one at its end
    # a run killed after its first checkpoint, then moved (and its work dir spelled otherwise)
    shutil.copytree(tmp_path / "r", tmp_path / "moved")
    for path in list_checkpoints(tmp_path / "moved" / "checkpoints")[1:]:
        shutil.rmtree(path)
    for name in ("metrics.csv", "best", "epochs"):
        target = tmp_path / "moved" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    moved = TrainConfig(work_dir=f"{tmp_path}/./w", run_dir=f"{tmp_path}/moved/", **common)
    messages: list[str] = []
    train(moved, log=messages.append)
    assert any(
        f"resumed from {tmp_path / 'moved' / 'checkpoints' / ckpts[0].name}" in m for m in messages
    ), messages
    rows = [list(csv.DictReader((tmp_path / d / "metrics.csv").open())) for d in ("r", "moved")]
    assert len(rows[0]) == len(rows[1]) == 1
    assert rows[1][0]["train_loss"] == rows[0][0]["train_loss"]  # not the mean of a part
    assert rows[1][0]["val_CIDEr-D"] == rows[0][0]["val_CIDEr-D"]


# ---- devices and precision (every device-aware path, run on the CPU) -------------------------


def test_explicit_cpu_device_gives_the_same_weights_as_before(small_data, tmp_path):
    """--device cpu and --precision fp32 are today's path: the same numbers for the same seed
    as the defaults (auto resolves to the CPU here), through the on-demand feature store."""
    common = dict(data_dir=str(small_data), work_dir=str(tmp_path / "w"), epochs=1, **SMALL)
    train(TrainConfig(run_dir=str(tmp_path / "auto"), max_steps=3, **common))
    explicit = dict(device="cpu", precision="fp32")
    train(TrainConfig(run_dir=str(tmp_path / "cpu"), max_steps=3, **common, **explicit))
    a, b = _final_weights(tmp_path / "auto"), _final_weights(tmp_path / "cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_training_runs_on_the_cpu(small_data, tmp_path, precision):
    """The GPU's mixed-precision path (autocast; a GradScaler for fp16), exercised on the CPU;
    then SCST fine-tunes the result in the same precision."""
    from captioner.training.config import ScstConfig
    from captioner.training.scst import train_scst

    cfg = TrainConfig(
        data_dir=str(small_data),
        work_dir=str(tmp_path / "w"),
        run_dir=str(tmp_path / "r"),
        epochs=1,
        device="cpu",
        precision=precision,
        **SMALL,
    )
    best = train(cfg)
    ckpt = list_checkpoints(tmp_path / "r" / "checkpoints")[-1]
    history = json.loads((ckpt / "state.json").read_text())["progress"]["history"]
    assert len(history) == 1 and 0 < float(history[0]["train_loss"]) < 20
    weights = _final_weights(tmp_path / "r")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    scst = ScstConfig(
        init_model=str(best),
        work_dir=cfg.work_dir,
        run_dir=str(tmp_path / "scst"),
        images_per_batch=4,
        samples_per_image=2,
        max_length=6,
        threads=1,
        max_steps=2,
        device="cpu",
        precision=precision,
    )
    train_scst(scst, log=lambda *a: None)
    assert list_checkpoints(tmp_path / "scst" / "checkpoints")
