"""Build the tokenizer files in configs/: CLIP's from the BPE vocabulary shipped in open-clip-torch,
T5's (FLUX.1's second tokenizer) from the tokenizer.json shipped in the invokeai wheel.

Usage:
    python scripts/build_tokenizers.py              # download the wheels with pip, write the files
    python scripts/build_tokenizers.py --wheel W --t5-wheel T   # use wheels already on disk
    python scripts/build_tokenizers.py --check      # exit 1 if the files on disk differ
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

OPEN_CLIP_REQUIREMENT = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# CLIP keeps the first 49152 - 256 - 2 merges, so that 256 bytes x 2 + merges + 2 specials = 49408.
MERGE_COUNT = 49152 - 256 - 2
VOCAB_SIZE = 49408


@dataclass(frozen=True)
class TokenizerFolder:
    """A tokenizer folder under configs/ and the pad token its real hub repo uses."""

    relative_path: str
    pad_token: str


# OpenAI CLIP-L tokenizers pad with <|endoftext|>; the OpenCLIP ones (SD2, SDXL's bigG) pad with "!".
TOKENIZER_FOLDERS: tuple[TokenizerFolder, ...] = (
    TokenizerFolder("sd15/tokenizer", END_TOKEN),
    TokenizerFolder("sd21/tokenizer", "!"),
    TokenizerFolder("sdxl/tokenizer", END_TOKEN),
    TokenizerFolder("sdxl/tokenizer_2", "!"),
    TokenizerFolder("flux1-dev/tokenizer", END_TOKEN),
    TokenizerFolder("flux1-schnell/tokenizer", END_TOKEN),
)

# T5 v1.1 (FLUX.1's text_encoder_2): the SentencePiece vocabulary as a `tokenizers` JSON file, so
# neither sentencepiece nor a hub download is needed.
INVOKEAI_REQUIREMENT = "invokeai==6.14.2"
T5_MEMBER_DIR = "invokeai/backend/t5/tokenizer/"
T5_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
T5_MAX_LENGTH = 512  # FLUX.1-dev's T5 sequence length; schnell's pipelines pass 256 themselves
T5_FOLDERS: tuple[str, ...] = ("flux1-dev/tokenizer_2", "flux1-schnell/tokenizer_2")


@cache
def bytes_to_unicode() -> dict[int, str]:
    """Return CLIP's reversible map from each byte value to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def read_bpe_lines(wheel: Path) -> list[str]:
    """Return the lines of the BPE merges file inside an open-clip-torch wheel."""
    with zipfile.ZipFile(wheel) as archive:
        compressed = archive.read(BPE_MEMBER)
    return gzip.decompress(compressed).decode("utf-8").split("\n")


def parse_merges(bpe_lines: list[str]) -> list[tuple[str, str]]:
    """Return the merge pairs CLIP uses: lines 1..MERGE_COUNT (line 0 is a version header)."""
    pairs = [tuple(line.split()) for line in bpe_lines[1 : MERGE_COUNT + 1]]
    if len(pairs) != MERGE_COUNT or any(len(pair) != 2 for pair in pairs):
        raise ValueError("the BPE file does not hold the expected CLIP merges")
    return [(first, second) for first, second in pairs]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Return the token-to-id map in CLIP's order: bytes, bytes + </w>, merges, specials."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars]
    tokens += [first + second for first, second in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab


def tokenizer_config(pad_token: str) -> dict[str, object]:
    """Return tokenizer_config.json for a CLIPTokenizer padding with `pad_token`."""
    return {
        "add_prefix_space": False,
        "bos_token": START_TOKEN,
        "do_lower_case": True,
        "eos_token": END_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": END_TOKEN,
    }


def special_tokens_map(pad_token: str) -> dict[str, str]:
    """Return special_tokens_map.json for a CLIPTokenizer padding with `pad_token`."""
    return {
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "pad_token": pad_token,
        "unk_token": END_TOKEN,
    }


def dump_json(data: object) -> str:
    """Serialize `data` the same way every time, so that reruns produce identical files."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def render_folder(
    folder: TokenizerFolder, vocab: dict[str, int], merges: list[tuple[str, str]]
) -> dict[str, str]:
    """Return file name -> text for every file of one tokenizer folder."""
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return {
        # One compact line: the vocabulary would be ~3x larger indented.
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": merges_text,
        "tokenizer_config.json": dump_json(tokenizer_config(folder.pad_token)),
        "special_tokens_map.json": dump_json(special_tokens_map(folder.pad_token)),
    }


def render_t5_folder(wheel: Path) -> dict[str, str]:
    """Return file name -> text for the T5 tokenizer folder, normalised from the invokeai wheel:
    stable JSON, `model_max_length` 512, the tokenizers-backed class."""
    with zipfile.ZipFile(wheel) as archive:
        loaded = {name: json.loads(archive.read(T5_MEMBER_DIR + name)) for name in T5_FILES}
    config = loaded["tokenizer_config.json"]
    config["model_max_length"] = T5_MAX_LENGTH
    config["tokenizer_class"] = "T5Tokenizer"
    model = loaded["tokenizer.json"].get("model", {})
    if model.get("type") != "Unigram" or len(model.get("vocab", ())) != 32100:
        raise ValueError(f"{wheel.name}: {T5_MEMBER_DIR}tokenizer.json is not the T5 vocabulary")
    return {
        # One compact line: the vocabulary would be much larger indented.
        "tokenizer.json": json.dumps(loaded["tokenizer.json"], ensure_ascii=False) + "\n",
        "tokenizer_config.json": dump_json(config),
        "special_tokens_map.json": dump_json(loaded["special_tokens_map.json"]),
    }


def download_wheel(target_dir: Path, requirement: str = OPEN_CLIP_REQUIREMENT) -> Path:
    """Download a wheel (without dependencies) with pip and return its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += [requirement, "-d", str(target_dir)]
    subprocess.run(command, check=True)
    project = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(target_dir.glob(f"{project}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip left no {project} wheel in {target_dir}")
    return wheels[0]


def expected_files(wheel: Path, configs_dir: Path, t5_wheel: Path | None = None) -> dict[Path, str]:
    """Return path -> text for every tokenizer file this script owns (the T5 ones only when
    `t5_wheel` is given)."""
    merges = parse_merges(read_bpe_lines(wheel))
    vocab = build_vocab(merges)
    files: dict[Path, str] = {}
    for folder in TOKENIZER_FOLDERS:
        for name, text in render_folder(folder, vocab, merges).items():
            files[configs_dir / folder.relative_path / name] = text
    if t5_wheel is not None:
        t5_files = render_t5_folder(t5_wheel)
        for relative_path in T5_FOLDERS:
            for name, text in t5_files.items():
                files[configs_dir / relative_path / name] = text
    return files


def stale_files(files: dict[Path, str]) -> list[Path]:
    """Return the paths whose content on disk differs from the expected text."""
    return [
        path
        for path, text in files.items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]


def write_files(files: dict[Path, str]) -> None:
    """Write every file, creating folders; unchanged files are left untouched."""
    for path in stale_files(files):
        path.parent.mkdir(parents=True, exist_ok=True)
        # newline="\n" so that the files are byte-identical on every OS.
        path.write_text(files[path], encoding="utf-8", newline="\n")
        logger.info("wrote %s", path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="open-clip-torch wheel to read (default: pip)")
    parser.add_argument("--t5-wheel", type=Path, help="invokeai wheel to read (default: pip)")
    parser.add_argument("--configs", type=Path, default=CONFIGS_DIR, help="configs folder")
    parser.add_argument("--check", action="store_true", help="verify only; exit 1 on differences")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build (or with --check, verify) the tokenizer files; return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        t5_wheel = args.t5_wheel or download_wheel(Path(tmp), INVOKEAI_REQUIREMENT)
        files = expected_files(wheel, args.configs, t5_wheel)
    if args.check:
        stale = stale_files(files)
        for path in stale:
            logger.error("out of date: %s", path)
        return 1 if stale else 0
    write_files(files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
