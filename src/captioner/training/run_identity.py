"""What a resumed run must share with the run it continues, beyond its settings file.

The vocabulary comes from the work dir, not from the run's settings: `prepare --force
--min-count 4` under a run changes it while train_config.json still matches, and the old
checkpoints then no longer fit the model. So the run keeps a copy of the vocabulary it was
started with (``run_vocab.json``) and a changed one is refused like any changed setting.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from captioner.data.vocab import Vocabulary
from captioner.errors import ConfigError, VocabularyError
from captioner.io import read_json

RUN_VOCAB = "run_vocab.json"


def _started_with(run_dir: Path) -> Vocabulary | None:
    """The vocabulary the run was started with: its own copy, or for runs from before that
    copy was kept, the one saved with its best model; None for a new run."""
    for path in (run_dir / RUN_VOCAB, run_dir / "best" / "vocab.json"):
        if path.is_file():
            try:
                return Vocabulary.load(path)
            except VocabularyError as exc:
                raise ConfigError(
                    f"{exc}; pass --restart to start the run over, or use another --run-dir"
                ) from exc
    return None


def check_vocabulary(run_dir: Path, vocab: Vocabulary, work_dir: str, restart: bool) -> None:
    """Refuse to resume ``run_dir`` with another vocabulary than the one it started with."""
    if restart:
        return
    old = _started_with(Path(run_dir))
    if old is None or old.itos == vocab.itos:
        return
    raise ConfigError(
        f"the vocabulary of {work_dir} changed since {run_dir} was started ({len(old)} tokens "
        f"then, {len(vocab)} now: was it prepared again?); a changed vocabulary is a changed "
        "setting: pass --restart to start over with it (the old checkpoints are set aside), "
        "or use another --run-dir"
    )


def record_vocabulary(run_dir: Path, vocab: Vocabulary) -> None:
    """Keep the run's vocabulary with it (rewritten only when it is new or changed)."""
    path = Path(run_dir) / RUN_VOCAB
    if not path.is_file() or read_json(path).get("itos") != vocab.itos:
        vocab.save(path)


def note_extension(
    saved_epochs: int | None, done_epochs: int, epochs: int, log: Callable[[str], None]
) -> None:
    """Say so when a finished run is extended by a larger --epochs (not a silent change)."""
    if saved_epochs is not None and done_epochs >= saved_epochs and epochs > done_epochs:
        log(
            f"extending the finished run from {saved_epochs} to {epochs} epochs: best/ is "
            "rewritten (and its grounding removed) only when a new epoch beats it"
        )


def saved_epochs(settings_file: Path) -> int | None:
    """--epochs of the run saved in ``settings_file``, before this process overwrites it."""
    try:
        value = read_json(settings_file).get("epochs") if settings_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None
