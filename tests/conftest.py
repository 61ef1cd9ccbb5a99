"""Test-wide setup: no model hub (offline flag and an empty hub cache), and tiny checkpoints
written once per session as real single-file `.safetensors` in the original key layout."""

from __future__ import annotations

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
