"""Broken LoRA files are errors about that file: never a dead process (SIGBUS from a file changed
under an mmap), never a huge allocation, never an exception type the engine does not expect."""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from app_in_process import run_app
from safetensors.torch import save_file

from webui.networks.format import files
from webui.networks.format.files import NetworkFileError, load_tensors, read_header
from webui.networks.format.network import load_network

UP = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"
DOWN = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
ALPHA = "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"
PREFIX = "lora_unet_down_blocks_0_attentions_0_proj_in"


def write_lora(path: Path, out: int = 8, rank: int = 2, width: int = 8) -> Path:
    save_file(
        {UP: torch.randn(out, rank), DOWN: torch.randn(rank, width), ALPHA: torch.tensor(1.0)},
        str(path),
    )
    return path


def raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


CHILD_TIMEOUT_S = 300


def run_isolated(body: Callable[[], str]) -> tuple[int, str]:
    """Run `body` in a forked child (no second interpreter to import torch into), so a SIGBUS
    kills only the child and fails the test instead of pytest. Returns the child's wait status
    and what `body` returned, or the child's traceback."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's cleanups
        status = 0
        try:
            message = body()
        except BaseException:
            message, status = traceback.format_exc(), 1
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(message)
        os._exit(status)
    os.close(write_end)
    # a child stuck on a lock another thread held at the fork must fail the test, not hang CI
    ready, _, _ = select.select([read_end], [], [], CHILD_TIMEOUT_S)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        pytest.fail(f"the forked child gave no answer in {CHILD_TIMEOUT_S} s")
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    _, status = os.waitpid(pid, 0)
    return status, message


def test_file_truncated_while_the_loader_holds_it_does_not_kill_the_process(
    tmp_path: Path,
) -> None:
    # safetensors' own loader maps the file; truncating it after the map is made used to
    # raise SIGBUS at the first tensor read. The file is cut at the moment it is opened.
    path = write_lora(tmp_path / "big.safetensors", out=1024, rank=64, width=1024)

    def load_while_cut() -> str:
        real_open = safetensors.torch.safe_open

        class CuttingOpen:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.inner = real_open(*args, **kwargs)

            def __enter__(self) -> Any:
                handle = self.inner.__enter__()
                os.truncate(path, 200)
                return handle

            def __exit__(self, *args: Any) -> Any:
                return self.inner.__exit__(*args)

        safetensors.torch.safe_open = CuttingOpen  # type: ignore[misc]  (the child's copy)
        real_read = getattr(files, "_read_whole", None)
        if real_read is not None:

            def cutting_read(p: Path, max_bytes: int) -> bytes:
                data = real_read(p, max_bytes)
                os.truncate(path, 200)  # too late to matter: the bytes are ours
                return data

            files._read_whole = cutting_read  # type: ignore[attr-defined]
        try:
            return f"loaded {sorted(files.load_tensors(path))}"
        except files.NetworkFileError as error:
            return f"error {error}"

    status, message = run_isolated(load_while_cut)
    assert status == 0, (os.waitstatus_to_exitcode(status), message[-2000:])
    assert message.startswith(("loaded", "error"))


def test_file_overwritten_in_place_while_loading_gives_only_file_errors(tmp_path: Path) -> None:
    # `cp other.safetensors this.safetensors` rewrites in place, with a different size.
    path = write_lora(tmp_path / "flip.safetensors", out=512, rank=32, width=512)
    small = write_lora(tmp_path / "small.safetensors", out=8, rank=1, width=8).read_bytes()
    large = path.read_bytes()

    def load_while_rewritten() -> str:
        stop = threading.Event()

        def rewrite() -> None:
            while not stop.is_set():
                for data in (small, large):
                    with open(path, "r+b") as handle:
                        handle.truncate(0)
                        handle.write(data)

        writer = threading.Thread(target=rewrite)
        writer.start()
        outcomes = set()
        try:
            for _ in range(300):
                try:
                    load_tensors(path)
                    outcomes.add("loaded")
                except NetworkFileError as error:
                    assert str(path) in str(error), error
                    outcomes.add("error")
        finally:
            stop.set()
            writer.join()
        return str(sorted(outcomes))

    assert len(large) > len(small)
    status, message = run_isolated(load_while_rewritten)
    assert status == 0, (os.waitstatus_to_exitcode(status), message[-2000:])


def test_data_cut_after_the_header_names_the_file(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "cut.safetensors", out=64, rank=4, width=64)
    header_end = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    with path.open("r+b") as handle:
        handle.truncate(header_end + 10)
    with pytest.raises(NetworkFileError) as caught:
        load_network(path)
    assert caught.value.path == path
    assert "truncated" in caught.value.reason


def test_size_cap_names_the_file(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "huge.safetensors")
    with pytest.raises(NetworkFileError, match="limit for LoRA files") as caught:
        load_tensors(path, max_bytes=100)
    assert caught.value.path == path


def test_pickle_is_read_from_memory_and_refused_when_cut(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({UP: torch.randn(8, 2), DOWN: torch.randn(2, 8), ALPHA: 1.0}, path)
    assert set(load_tensors(path)) == {UP, DOWN, ALPHA}
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(NetworkFileError) as caught:
        load_tensors(path)
    assert caught.value.path == path


def test_huge_declared_shape_is_refused_from_the_header(tmp_path: Path) -> None:
    # 100000 x 100000 F32 is 40 GB; the file holds 32 bytes for it.
    path = tmp_path / "liar.safetensors"
    header = {UP: {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 32]}}
    path.write_bytes(raw_safetensors(header, bytes(32)))
    with pytest.raises(NetworkFileError, match="declares 100000x100000 F32") as caught:
        read_header(path)
    assert UP in caught.value.reason
    with pytest.raises(NetworkFileError):
        load_network(path)


def test_deleted_file_is_a_file_error(tmp_path: Path) -> None:
    path = tmp_path / "gone.safetensors"
    with pytest.raises(NetworkFileError) as caught:
        load_network(path)
    assert caught.value.path == path


def _module_file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({f"{PREFIX}.{k}": v for k, v in tensors.items()}, str(path))
    return path


MALFORMED = {
    "rank_mismatch": (
        {"lora_up.weight": torch.randn(8, 4), "lora_down.weight": torch.randn(2, 8)},
        "rank",
    ),
    "zero_dim_up": (
        {"lora_up.weight": torch.tensor(1.0), "lora_down.weight": torch.randn(2, 8)},
        "lora_up has shape ()",
    ),
    "two_value_alpha": (
        {
            "lora_up.weight": torch.randn(8, 2),
            "lora_down.weight": torch.randn(2, 8),
            "alpha": torch.tensor([1.0, 2.0]),
        },
        "alpha must be one number",
    ),
    "nan_alpha": (
        {
            "lora_up.weight": torch.randn(8, 2),
            "lora_down.weight": torch.randn(2, 8),
            "alpha": torch.tensor(float("nan")),
        },
        "alpha is nan",
    ),
    "empty_rank": (
        {"lora_up.weight": torch.randn(8, 0), "lora_down.weight": torch.randn(0, 8)},
        "empty",
    ),
    # 3 stages pair rows up to 4·(block/2) apart: 3 blocks of 4 cannot be butterflied
    "bad_boft": ({"oft_blocks": torch.randn(3, 3, 4, 4)}, "butterfly"),
    "non_square_oft": ({"oft_blocks": torch.randn(2, 4, 3)}, "last two dims"),
    "loha_halves_disagree": (
        {
            "hada_w1_a": torch.randn(8, 2),
            "hada_w1_b": torch.randn(2, 8),
            "hada_w2_a": torch.randn(6, 2),
            "hada_w2_b": torch.randn(2, 8),
        },
        "two LoHa halves",
    ),
    "lokr_inner_rank": (
        {
            "lokr_w1": torch.randn(2, 2),
            "lokr_w2_a": torch.randn(4, 3),
            "lokr_w2_b": torch.randn(2, 4),
        },
        "lokr_w2_a columns",
    ),
    "diff_bias_size": ({"diff": torch.randn(8, 8), "diff_b": torch.randn(3)}, "diff_b"),
    "ia3_vector_on_input": (
        {"weight": torch.randn(8), "on_input": torch.tensor([1.0, 0.0])},
        "on_input must be one number",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_module_is_a_file_error_naming_the_key(tmp_path: Path, case: str) -> None:
    tensors, reason = MALFORMED[case]
    path = _module_file(tmp_path / f"{case}.safetensors", tensors)
    with pytest.raises(NetworkFileError) as caught:
        load_network(path)
    assert caught.value.path == path
    assert PREFIX in caught.value.reason
    assert reason in caught.value.reason


def test_well_formed_variants_still_load(tmp_path: Path) -> None:
    # the same shapes, made consistent, pass validation (a guard against over-strict checks)
    good = {
        "boft": {"oft_blocks": torch.randn(2, 2, 4, 4), "rescale": torch.ones(8)},
        "lokr": {
            "lokr_w1": torch.randn(2, 2),
            "lokr_w2_a": torch.randn(4, 2),
            "lokr_w2_b": torch.randn(2, 4),
        },
        "tucker": {
            "lora_up.weight": torch.randn(8, 2, 1, 1),
            "lora_mid.weight": torch.randn(2, 2, 3, 3),
            "lora_down.weight": torch.randn(2, 8, 1, 1),
        },
    }
    for name, tensors in good.items():
        network = load_network(_module_file(tmp_path / f"{name}.safetensors", tensors))
        assert list(network.modules) == [PREFIX], name


def test_inspect_lora_reports_a_zero_dim_tensor_without_a_traceback(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = _module_file(
        tmp_path / "scalar.safetensors",
        {"lora_up.weight": torch.tensor(1.0), "lora_down.weight": torch.tensor(2.0)},
    )
    result = run_app(capfd, "inspect-lora", str(path))  # an uncaught exception fails the test
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr and "lora_up has shape ()" in result.stderr


@pytest.mark.parametrize(
    "adapter_metadata", ["[1, 2]", '{"unet.alpha_pattern": {"to_q": "x"}}', "[" * 10_000]
)
def test_garbled_peft_metadata_is_ignored(tmp_path: Path, adapter_metadata: str) -> None:
    path = tmp_path / "peft.safetensors"
    save_file(
        {UP: torch.randn(8, 2), DOWN: torch.randn(2, 8)},
        str(path),
        {"lora_adapter_metadata": adapter_metadata},
    )
    assert list(load_network(path).modules) == [PREFIX]
