"""Test-wide setup: no model hub (offline flag and an empty hub cache), and tiny checkpoints
written once per session as real single-file `.safetensors` in the original key layout."""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub: offline, with an empty cache nobody has filled.
_EMPTY_HOME = tempfile.mkdtemp(prefix="empty-hf-home-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = _EMPTY_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_EMPTY_HOME, "hub")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
# hypothesis keeps caches (constants, unicode tables) in its storage folder: not in the repo
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(_EMPTY_HOME, "hypothesis"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests: reproducible (derandomized), no example database written into the repo, and no
# per-example deadline (a 2-core CI machine under xdist has noisy timings; time bounds are asserted
# by the tests themselves where they matter).
settings.register_profile("webui", derandomize=True, database=None, deadline=None)
settings.load_profile("webui")

# pytest-xdist runs one worker per core: more threads per worker only contend for the cores
torch.set_num_threads(1)

from webui.arch import Arch, Prediction  # noqa: E402

# Files that take tens of seconds each (a browser and an app server, a soak, a Ray cluster): run
# first, so that xdist's two workers end together instead of one finishing a long file alone.
HEAVY_MARKERS = ("slow", "cluster")


def _is_heavy(item: pytest.Item) -> bool:
    return "browser" in item.path.name or any(item.get_closest_marker(m) for m in HEAVY_MARKERS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    heavy_files = {item.path for item in items if _is_heavy(item)}
    items.sort(key=lambda item: item.path not in heavy_files)  # stable: file order kept otherwise


def pytest_collection_finish(session: pytest.Session) -> None:
    # what the imports and the collection made lives for the whole run: out of the collector's
    # sight, every full collection (automatic ones included) walks only what tests make
    gc.freeze()


@pytest.fixture(scope="session")
def chromium():
    """One headless system Chromium per test process; each test opens its own context
    (`tests.chromium.browser_context`, or `app_page` for the app's page). Skips the test where /usr/bin/chromium is missing."""
    from tests.chromium import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    """Writes (once per session and kind) a tiny checkpoint and returns its path."""
    from webui.engine.checkpoints import ModelKind, save_single_file
    from webui.engine.model_factory import ModelSpec, build_pipeline

    folder = tmp_path_factory.mktemp("models")
    written: dict[tuple[Arch, Prediction], Path] = {}

    def make(arch: Arch, prediction: Prediction = Prediction.EPSILON) -> Path:
        if (arch, prediction) not in written:
            pipe = build_pipeline(ModelSpec(arch, prediction))
            path = folder / f"tiny-{arch.value.lower()}-{prediction.value}.safetensors"
            save_single_file(pipe, ModelKind(arch, prediction), path, embed_configs=True)
            written[arch, prediction] = path
        return written[arch, prediction]

    return make
