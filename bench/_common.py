"""Helpers shared by the benchmark scripts in bench/ (run as ``python bench/<script>.py``)."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (REPO / ".." / "shared" / "data" / "flickr8k").resolve()
DEFAULT_WORK = REPO / "work" / "flickr8k"


def use_src() -> None:
    """Import ``captioner`` from this checkout's src/ (ahead of any installed copy)."""
    sys.path.insert(0, str(REPO / "src"))


def new_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help shows the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)


def add_dir_args(
    parser: argparse.ArgumentParser,
    work_help: str,
    data_help: str = "Flickr8k folder with images/*.jpg",
) -> None:
    """The --data-dir and --work-dir flags every Flickr8k benchmark takes."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA,
        help=f"{data_help} (default: {DEFAULT_DATA})",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK,
        help=f"{work_help} (default: {DEFAULT_WORK})",
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def print_header(title: str, threads: int, onnxruntime: bool = True) -> None:
    """Title, command line, machine and software versions (onnxruntime's too unless told not
    to), and a warning when the machine is already busy."""
    import torch

    ort = ""
    if onnxruntime:
        import onnxruntime as ort_module

        ort = f", onnxruntime {ort_module.__version__}"

    print(f"## {title}\n")
    print(f"command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`  ")
    print(
        f"machine: {cpu_model()}, os.cpu_count()={os.cpu_count()}, load average {load_average()}  "
    )
    print(
        f"software: python {platform.python_version()}, torch {torch.__version__} "
        f"(torch.get_num_threads()={torch.get_num_threads()}){ort}; "
        f"benchmark threads={threads}\n",
        flush=True,
    )

    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        print(
            f"**warning**: load average {load:.1f} on {cores} cores before starting: other "
            "processes are running, so absolute numbers are low and noisy (with several threads "
            "per backend, workers also wait on descheduled peers); the interleaved ratio is "
            "the more robust number\n",
            flush=True,
        )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def dataset_images_dir(data_dir: Path) -> Path:
    """The folder of the dataset's JPEGs; exits with a message if there is none."""
    if not data_dir.is_dir():
        sys.exit(
            f"error: data directory not found: {data_dir}\n"
            "pass --data-dir pointing at Flickr8k (images/*.jpg + captions.txt)"
        )
    from captioner.data.prepare import find_images_dir
    from captioner.errors import DataError

    try:
        return find_images_dir(data_dir)
    except DataError as exc:
        sys.exit(f"error: {exc}")


def jpegs(folder: Path) -> list[Path]:
    """The JPEGs directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
