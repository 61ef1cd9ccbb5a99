"""`python app.py generate` end to end: once in a subprocess, as a user runs it from the shell;
the other cases through `app.main` in this process (same output, without the ~10 s of imports)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from app_in_process import run_app
from lora_files import write_kohya_lora
from PIL import Image

from webui.arch import Arch
from webui.engine.infotext import parse_infotext

ROOT = Path(__file__).resolve().parents[1]


CACHE = Path(tempfile.gettempdir()) / "lora-webui-test-cli-cache"  # never the repo's .cache


def run_app_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "app.py", "--cache-dir", str(CACHE), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def cli(capfd: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_app(capfd, "--cache-dir", str(CACHE), *args)


def test_generate_writes_pngs_with_infotext_and_prints_few_lines(
    tiny_checkpoint_factory, tmp_path: Path
) -> None:
    """The one real `python app.py generate` from the shell (the others run in this process):
    PNGs with their infotext, and a quiet console (a fresh process shows the libraries' import
    warnings): at most 10 lines, no progress bar, no warning from the libraries."""
    model = tiny_checkpoint_factory(Arch.SDXL)
    out = tmp_path / "out" / "fox.png"
    done = run_app_process(
        "generate", "--model", str(model), "--prompt", "a fox", "--negative", "blurry",
        "--steps", "2", "--seed", "11", "--width", "64", "--height", "64",
        "--sampler", "DPM++ 2M Karras", "--batch-size", "2", "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    written = [tmp_path / "out" / "fox-1.png", tmp_path / "out" / "fox-2.png"]
    assert done.stdout.split() == [str(p) for p in written]
    for path, seed in zip(written, ("11", "12"), strict=True):
        with Image.open(path) as image:
            assert image.size == (64, 64)
            parsed = parse_infotext(image.info["parameters"])
        assert parsed.prompt == "a fox"
        assert parsed.negative_prompt == "blurry"
        assert parsed.params["Seed"] == seed
        assert parsed.params["Sampler"] == "DPM++ 2M Karras"
        assert parsed.params["Steps"] == "2"
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) <= 10, lines  # 8 today: 2 paths, 2 model lines, a blank, 2 steps, a total
    assert not any("it/s" in line or "Warning" in line for line in lines), lines
    assert any(line.startswith("model loaded: ") for line in lines)
    assert any(line.startswith("generated 2 image(s) in ") for line in lines)


def test_generate_reports_a_non_checkpoint_without_traceback(tmp_path: Path, capfd) -> None:
    bogus = tmp_path / "notes.safetensors"
    bogus.write_bytes(b"hello")
    done = cli(
        capfd, "generate", "--model", str(bogus), "--prompt", "x", "--out", str(tmp_path / "x.png")
    )
    assert done.returncode == 2
    assert "notes.safetensors" in done.stderr
    assert "Traceback" not in done.stderr


def test_generate_prints_tag_warnings(tmp_path: Path, capfd) -> None:
    out = tmp_path / "x.png"
    done = cli(
        capfd, "generate", "--model", "demo", "--prompt", "a fox <lora:nothere:1>", "--steps", "1",
        "--width", "64", "--height", "64", "--loras-dir", str(tmp_path), "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "warning: <lora:nothere>: no LoRA file named 'nothere'" in done.stderr
    assert out.is_file()


def test_generate_shows_lora_progress_then_steps(tmp_path: Path, capfd) -> None:
    write_kohya_lora(tmp_path / "ink.safetensors", Arch.SD1)
    done = cli(
        capfd, "generate", "--model", "demo", "--prompt", "a fox <lora:ink:1>", "--steps", "2",
        "--width", "64", "--height", "64", "--loras-dir", str(tmp_path),
        "--out", str(tmp_path / "x.png"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # splitlines() reads the progress line's carriage returns as line ends
    shown = [line.strip() for line in done.stderr.splitlines()]
    progress = [line for line in shown if line.startswith(("Applying LoRAs:", "Step "))]
    loras = [line for line in progress if line.startswith("Applying LoRAs:")]
    assert loras and progress[: len(loras)] == loras  # the modules come first
    done_modules, total_modules = loras[-1].removeprefix("Applying LoRAs: ").split()[0].split("/")
    assert done_modules == total_modules and loras[-1].endswith(" modules")
    assert progress[len(loras) :] == ["Step 1/2", "Step 2/2"]
