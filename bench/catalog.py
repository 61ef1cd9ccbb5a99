"""Benchmark: scanning a LoRA folder into the catalog index, cold (no cache) and warm (cache
present, nothing changed), as the Networks browser does at start-up.

Writes --count small kohya-style LoRA files (a few fp16 tensors, realistic `ss_*` metadata with
an `ss_tag_frequency` blob of two dataset folders) into 50 sub-folders of a temporary folder,
every 5th with an A1111 `<name>.json`, every 10th with a `<name>.preview.png`, then times:

- cold: a new `CatalogIndex` with no cache file, first `entries()` (reads every header, writes
  the cache);
- warm: a new `CatalogIndex` on the same cache, first `entries()`, in this process;
- warm, new process: the same in a fresh Python process (imports not counted), which is what a
  restart of the app pays;
- refresh: `refresh()` again on that warm index (the Refresh button).

Hashing is off (it runs in the background in the app and is not part of the scan).

    python -m bench.catalog --count 5000 --repeats 3 --out bench/results/catalog.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from webui.networks.library import CatalogIndex

FOLDERS = 50
_MODULES = (
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
)
_WORDS_TEXT = (
    "1girl solo smile looking_at_viewer long_hair short_hair blue_eyes red_eyes brown_hair "
    "black_hair blonde_hair outdoors indoors sky cloud tree flower water night day city street "
    "dress shirt skirt jacket hat glasses holding standing sitting upper_body full_body portrait "
    "simple_background white_background monochrome greyscale sketch lineart watercolor ink "
    "painting traditional_media realistic photorealistic detailed_background scenery landscape "
    "mountain river ocean beach forest snow rain sunset sunrise light_rays depth_of_field "
    "blurry_background bokeh from_side from_above from_below closed_eyes open_mouth teeth "
    "hand_up arms_up crossed_arms"
)
_WORDS = _WORDS_TEXT.split(" ")


def _tensors(rank: int) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for module in _MODULES:
        tensors[f"{module}.lora_down.weight"] = np.zeros((rank, 768), dtype=np.float16)
        tensors[f"{module}.lora_up.weight"] = np.zeros((320, rank), dtype=np.float16)
        tensors[f"{module}.alpha"] = np.array(rank / 2, dtype=np.float16)
    return tensors


def _metadata(index: int, rng: random.Random) -> dict[str, str]:
    name = f"lora_{index:05d}"
    frequency = {
        f"{rng.randint(1, 20)}_{name}": {w: rng.randint(1, 60) for w in rng.sample(_WORDS, 60)},
        "5_regularisation": {w: rng.randint(1, 30) for w in rng.sample(_WORDS, 40)},
    }
    frequency[next(iter(frequency))][name] = 80  # the trigger word captions every image
    return {
        "ss_output_name": name,
        "ss_base_model_version": "sd_v1",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
        "ss_resolution": "(512, 512)",
        "ss_num_epochs": "10",
        "ss_num_train_images": "80",
        "ss_max_train_steps": "1600",
        "ss_learning_rate": "0.0001",
        "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
        "ss_training_started_at": "1700000000.0",
        "ss_tag_frequency": json.dumps(frequency),
        "ss_dataset_dirs": json.dumps({k: {"n_repeats": 5, "img_count": 40} for k in frequency}),
        "sshs_model_hash": f"{index:064x}",
    }


# A 1x1 PNG: previews are listed by name; the scan never opens them.
_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8"
    "cfc0000003010100c9fe92ef0000000049454e44ae426082"
)


def write_loras(folder: Path, count: int, seed: int = 0) -> int:
    """Write `count` LoRA files (and some sidecars) below `folder`; returns the bytes written."""
    rng = random.Random(seed)
    written = 0
    for index in range(count):
        sub = folder / f"set_{index % FOLDERS:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"lora_{index:05d}.safetensors"
        save_file(_tensors(rank=8), str(path), metadata=_metadata(index, rng))
        written += path.stat().st_size
        if index % 5 == 0:
            user = {"activation text": f"lora_{index:05d}, style", "preferred weight": 0.8}
            path.with_name(path.stem + ".json").write_text(json.dumps(user))
        if index % 10 == 0:
            path.with_name(path.stem + ".preview.png").write_bytes(_PNG)
    return written


def _timed(action: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


_WARM_IN_NEW_PROCESS = """
import sys, time
from pathlib import Path
from webui.networks.library import CatalogIndex
index = CatalogIndex(Path(sys.argv[1]), Path(sys.argv[2]), hash_in_background=False)
started = time.perf_counter()
index.entries()
print(time.perf_counter() - started)
"""


def _warm_in_new_process(folder: Path, cache: Path) -> float:
    """A warm start as a restarted app pays it: a fresh interpreter, the cache on disk."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _WARM_IN_NEW_PROCESS, str(folder), str(cache)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
        capture_output=True,
        text=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def measure(folder: Path, cache: Path, repeats: int) -> dict[str, Any]:
    cold: list[float] = []
    warm: list[float] = []
    warm_new: list[float] = []
    refresh: list[float] = []
    entries = 0
    for _ in range(repeats):
        cache.unlink(missing_ok=True)
        seconds, listed = _timed(
            lambda: CatalogIndex(folder, cache, hash_in_background=False).entries()
        )
        cold.append(seconds)
        entries = len(listed)
        index = CatalogIndex(folder, cache, hash_in_background=False)
        warm.append(_timed(index.entries)[0])
        refresh.append(_timed(index.refresh)[0])
        warm_new.append(_warm_in_new_process(folder, cache))
    return {
        "entries": entries,
        "cache_bytes": cache.stat().st_size,
        "cold_s": {"median": statistics.median(cold), "min": min(cold), "all": cold},
        "warm_s": {"median": statistics.median(warm), "min": min(warm), "all": warm},
        "warm_new_process_s": {
            "median": statistics.median(warm_new),
            "min": min(warm_new),
            "all": warm_new,
        },
        "refresh_s": {"median": statistics.median(refresh), "min": min(refresh), "all": refresh},
    }


def _machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores_usable": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="LoRA files to write")
    parser.add_argument("--repeats", type=int, default=3, help="cold/warm pairs (median kept)")
    parser.add_argument("--folder", type=Path, help="reuse/keep this folder (default: temp)")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="catalog-bench-") as temporary:
        folder = args.folder or Path(temporary) / "loras"
        existing = sum(1 for _ in folder.rglob("*.safetensors")) if folder.is_dir() else 0
        write_s, written = 0.0, 0
        if existing != args.count:
            write_s, written = _timed(lambda: write_loras(folder, args.count))
        results = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench.catalog", *(argv or sys.argv[1:])]),
            "machine": _machine(),
            "count": args.count,
            "write_s": write_s,
            "bytes_written": written,
            **measure(folder, Path(temporary) / "catalog.json", args.repeats),
        }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
