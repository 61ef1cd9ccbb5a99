"""fp8 storage: a FLUX.1 transformer loaded from an fp8 file keeps its fp8 weights in memory and
upcasts each layer's weight to the compute dtype only for its forward (as Forge and ComfyUI do).

References: the file's own values (the original weights rounded to fp8), the upcast-at-load model
(fp8 -> fp32 is exact, so on the CPU both must give the same pixels), and LoRA deltas computed
by hand from the factors written into the file."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import logging
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_settings import cpu_settings
from flux_lora_files import write_flux_lora
from lora_files import one_torch_thread
from safetensors.torch import save_file
from torch import Tensor

import app
from webui.arch import Arch, FluxVariant
from webui.engine.checkpoints import (
    ModelKind,
    checkpoint_from_path,
    load_checkpoint,
    save_single_file,
)
from webui.engine.generate import Engine
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.networks.apply.apply_errors import NetworkApplyError
from webui.networks.apply.diffusers_backend import DiffusersBackend
from webui.networks.apply.patcher import NetworkPatcher
from webui.networks.format.modules import LoraModule
from webui.networks.format.network import Network, read_network
from webui.settings import Fp8Storage, Settings
from webui.ui.blocks import model_status_html

CPU = torch.device("cpu")
FP8 = torch.float8_e4m3fn
KIND = ModelKind(Arch.FLUX1, None, variant=FluxVariant.DEV)
# (BFL module, diffusers weights it lands on) for the hand-made LoRA
QKV = "double_blocks.0.img_attn.qkv"
MLP = "double_blocks.1.img_mlp.0"
PROJ = "double_blocks.0.img_attn.proj"  # with a bias difference (ComfyUI's `diff_b`)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@cache
def original() -> Any:
    return build_pipeline(ModelSpec(Arch.FLUX1, variant=FluxVariant.DEV), seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[torch.dtype, Path]:
    """The tiny FLUX.1 [dev] written as all-in-one fp8 files (ComfyUI's layout)."""
    folder = tmp_path_factory.mktemp("flux-fp8")
    paths = {}
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        path = folder / f"flux-{str(dtype).removeprefix('torch.')}.safetensors"
        save_single_file(original(), KIND, path, embed_configs=True, dtype=dtype)
        paths[dtype] = path
    return paths


@cache
def _loaded(path: Path, dtype: torch.dtype, stored: bool) -> Any:
    return load_checkpoint(checkpoint_from_path(path), CPU, dtype, fp8_storage=stored).pipe


def loaded(path: Path, dtype: torch.dtype = torch.float32, *, stored: bool = True) -> Any:
    """A private copy of the model loaded with (or without) fp8 storage."""
    return copy.deepcopy(_loaded(path, dtype, stored))


def raw(tensor: Tensor) -> Tensor:
    return tensor.detach().contiguous().view(torch.uint8)


def hidden(transformer: Any) -> int:
    return transformer.config.num_attention_heads * transformer.config.attention_head_dim


def lora_factors(seed: int, shape: tuple[int, int], rank: int = 4) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], rank, generator=g) * 0.1, torch.randn(rank, shape[1], generator=g)


def write_lora(
    path: Path, transformer: Any, seed: int, *, alpha: float = 2.0, bias: bool = True
) -> Path:
    """A kohya FLUX.1 LoRA (rank 4) on the fused image qkv, an MLP and the attention output,
    the last with a bias difference (`bias`)."""
    width = hidden(transformer)
    mlp_rows = transformer.transformer_blocks[1].ff.net[0].proj.out_features
    shapes = {QKV: (3 * width, width), MLP: (mlp_rows, width), PROJ: (width, width)}
    tensors: dict[str, Tensor] = {}
    for i, (bfl, shape) in enumerate(shapes.items()):
        key = "lora_unet_" + bfl.replace(".", "_")
        up, down = lora_factors(seed * 100 + i, shape)
        tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"] = up, down
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    if bias:
        tensors["lora_unet_" + PROJ.replace(".", "_") + ".diff_b"] = torch.linspace(
            -0.2, 0.3, width
        )
    save_file(tensors, str(path), metadata={"ss_base_model_version": "flux1"})
    return path


def stored_tensors(pipe: Any) -> dict[str, tuple[int, torch.dtype, Tensor]]:
    """Each transformer parameter's memory address, dtype and bytes."""
    return {
        name: (p.data_ptr(), p.dtype, raw(p).clone())
        for name, p in pipe.transformer.named_parameters()
    }


def assert_very_same(pipe: Any, before: dict[str, tuple[int, torch.dtype, Tensor]]) -> None:
    """Every parameter is the very tensor it was (same memory, dtype and bytes)."""
    now = stored_tensors(pipe)
    assert now.keys() == before.keys()
    for name, (ptr, dtype, data) in before.items():
        assert now[name][0] == ptr, f"{name}: another tensor"
        assert now[name][1] == dtype, f"{name}: {now[name][1]} instead of {dtype}"
        assert torch.equal(now[name][2], data), f"{name}: other bytes"


def generate(pipe: Any) -> np.ndarray:
    return pipe(
        "a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images[0]


# -- storage --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_transformer_weights_stay_fp8_and_take_half_of_bf16(
    files: dict[torch.dtype, Path], dtype: torch.dtype
) -> None:
    transformer = loaded(files[dtype]).transformer
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == dtype for m in linears)
    stored = sum(p.numel() * p.element_size() for p in transformer.parameters())
    in_linears = sum(p.numel() for m in linears for p in m.parameters())
    others = sum(p.numel() for p in transformer.parameters()) - in_linears
    # every Linear weight and bias in one byte; only the RMSNorm scales are upcast (fp32)
    assert stored == in_linears + 4 * others
    assert stored < 0.55 * 2 * (in_linears + others)  # bf16's bytes
    # the text encoders and VAE are upcast at load as before; the reference load keeps nothing
    pipe = loaded(files[dtype])
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.float32}, name
    if dtype == FP8:
        upcast = _loaded(files[dtype], torch.float32, False).transformer
        assert {p.dtype for p in upcast.parameters()} == {torch.float32}


# -- the same images as the upcast-at-load model --------------------------------------------------


@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "kohya-lora"])
def test_pixels_equal_the_upcast_at_load_model(
    files: dict[torch.dtype, Path], tmp_path: Path, with_lora: bool
) -> None:
    path = files[FP8]
    stored, upcast = loaded(path), loaded(path, stored=False)
    assert stored.transformer.x_embedder.weight.dtype == FP8  # the two really differ in memory
    if with_lora:
        lora = tmp_path / "kohya.safetensors"
        write_flux_lora(lora, path)
        network = read_network(lora)
        for pipe in (stored, upcast):
            NetworkPatcher(pipe, Arch.FLUX1).apply([(network, 0.8)])
    image = generate(stored)
    assert np.array_equal(image, generate(upcast))
    assert image.std() > 0  # an image, not a constant


# -- LoRA math on fp8 storage ---------------------------------------------------------------------


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=str)
def test_lora_on_fp8_storage_is_base_plus_delta_in_the_compute_dtype(
    files: dict[torch.dtype, Path], tmp_path: Path, compute: torch.dtype
) -> None:
    pipe = loaded(files[FP8], compute)
    transformer = pipe.transformer
    width, rank, alpha, multiplier = hidden(transformer), 4, 2.0, 0.7
    network = read_network(write_lora(tmp_path / "f.safetensors", transformer, seed=7))
    base = {k: v.to(FP8).float() for k, v in original().transformer.state_dict().items()}
    scale = multiplier * alpha / rank
    qkv = scale * torch.matmul(*lora_factors(700, (3 * width, width)))  # BFL rows [q; k; v]
    mlp_rows = transformer.transformer_blocks[1].ff.net[0].proj.out_features
    proj_up, proj_down = lora_factors(702, (width, width))
    deltas = {
        "transformer_blocks.0.attn.to_q.weight": qkv[:width],
        "transformer_blocks.0.attn.to_k.weight": qkv[width : 2 * width],
        "transformer_blocks.0.attn.to_v.weight": qkv[2 * width :],
        "transformer_blocks.1.ff.net.0.proj.weight": scale
        * torch.matmul(*lora_factors(701, (mlp_rows, width))),
        "transformer_blocks.0.attn.to_out.0.weight": scale * (proj_up @ proj_down),
        "transformer_blocks.0.attn.to_out.0.bias": multiplier * torch.linspace(-0.2, 0.3, width),
    }
    NetworkPatcher(pipe, Arch.FLUX1).apply([(network, multiplier)])
    after = dict(transformer.named_parameters())
    for key, delta in deltas.items():
        got = after[key]
        assert got.dtype == compute, key  # held in the compute dtype, never rounded to fp8
        want = (base[key] + delta).to(compute).float()
        # one rounding to the compute dtype, plus the fp32 product's summation order
        step = torch.finfo(compute).eps * want.abs() + 1e-6 * want.abs().max()
        assert ((got.float() - want).abs() <= step).all(), key
        assert (got.float().to(FP8).float() != got.float()).float().mean() > 0.5, key
    untouched = "transformer_blocks.1.attn.to_q.weight"
    assert after[untouched].dtype == FP8


# -- restore: the very fp8 tensors come back ------------------------------------------------------


@pytest.fixture(scope="module")
def networks(files: dict[torch.dtype, Path], tmp_path_factory: pytest.TempPathFactory) -> list:
    folder = tmp_path_factory.mktemp("fp8-loras")
    transformer = _loaded(files[FP8], torch.float32, True).transformer
    kohya = folder / "kohya.safetensors"
    write_flux_lora(kohya, files[FP8])
    made = [write_lora(folder / f"{n}.safetensors", transformer, seed=n) for n in (1, 2, 3)]
    return [read_network(p) for p in (*made, kohya)]


def test_restore_after_apply_and_two_switches_gives_back_the_very_fp8_tensors(
    files: dict[torch.dtype, Path], networks: list[Network]
) -> None:
    pipe = loaded(files[FP8])
    before = stored_tensors(pipe)
    a, b, c, kohya = networks
    patcher = NetworkPatcher(pipe, Arch.FLUX1)
    patcher.apply([(a, 0.8), (kohya, 0.5)])
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32
    patcher.restore()
    assert_very_same(pipe, before)

    patcher.apply([(a, 0.8), (kohya, 0.5)])
    patcher.apply([(b, 0.6), (kohya, 0.5)])  # switch: a out, b in
    patcher.apply([(c, 1.0)])  # and again
    patcher.restore()
    assert_very_same(pipe, before)
    # and a patch after a restore (into the kept spares) is written in the compute dtype again
    patcher.apply([(a, 0.8)])
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32
    patcher.restore()
    assert_very_same(pipe, before)


def test_a_delta_failing_part_way_gives_back_the_very_fp8_tensors(
    files: dict[torch.dtype, Path], networks: list[Network], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = loaded(files[FP8])
    before = stored_tensors(pipe)
    a, b, _, kohya = networks
    patcher = NetworkPatcher(pipe, Arch.FLUX1)
    calls = {"n": 0, "at": 5}
    factors_of = LoraModule.low_rank_factors

    def low_rank_factors(self: LoraModule, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise RuntimeError("delta failed")
        return factors_of(self, *args, **kwargs)

    monkeypatch.setattr(LoraModule, "low_rank_factors", low_rank_factors)
    written: list[int] = []
    with pytest.raises(NetworkApplyError, match="delta failed"):
        patcher.apply([(a, 0.8), (kohya, 0.5)], on_progress=lambda done, _: written.append(done))
    assert written, "the failure should come after some modules were written"
    assert_very_same(pipe, before)

    calls["at"] = 10**9
    patcher.apply([(a, 0.8)])
    applied = stored_tensors(pipe)
    assert applied["transformer_blocks.0.attn.to_q.weight"][1] == torch.float32
    calls["n"], calls["at"] = 0, 4
    with pytest.raises(NetworkApplyError, match="delta failed"):
        patcher.apply([(b, 0.6), (kohya, 0.5)])  # a failed switch: a's weights again
    assert [n.name for n, _ in patcher.current_set] == [a.name]
    now = stored_tensors(pipe)
    for name, (_, dtype, data) in applied.items():
        assert now[name][1] == dtype and torch.equal(now[name][2], data), name
    patcher.restore()
    assert_very_same(pipe, before)


# -- the diffusers fallback -----------------------------------------------------------------------


def test_the_diffusers_fallback_refuses_an_fp8_stored_model(
    files: dict[torch.dtype, Path], tmp_path: Path
) -> None:
    pipe = loaded(files[FP8])
    before = stored_tensors(pipe)
    plain = write_lora(tmp_path / "plain.safetensors", pipe.transformer, seed=9, bias=False)
    kohya = read_network(plain)  # a file diffusers' loader takes at this tiny size
    report = DiffusersBackend(pipe, Arch.FLUX1).apply([(kohya, 1.0)])
    (refused,) = report.networks
    assert not refused.applied
    assert refused.refusal is not None and "fp8" in refused.refusal, refused.refusal
    assert_very_same(pipe, before)
    # the upcast-at-load model still takes it through diffusers
    upcast = loaded(files[FP8], stored=False)
    assert DiffusersBackend(upcast, Arch.FLUX1).apply([(kohya, 1.0)]).networks[0].applied


# -- the setting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "kept"), [(Fp8Storage.ON, True), (Fp8Storage.AUTO, False), (Fp8Storage.OFF, False)]
)
def test_the_engine_loads_by_the_setting(
    files: dict[torch.dtype, Path],
    tmp_path: Path,
    choice: Fp8Storage,
    kept: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """...and says so where the user looks: the console's load line and the model status."""
    settings = cpu_settings(tmp_path, tmp_path, tmp_path, fp8_storage=choice, save_outputs=False)
    engine = Engine(settings)
    with caplog.at_level(logging.INFO, logger="webui"):
        model = engine.load_path(files[FP8])
    weight = model.pipe.transformer.x_embedder.weight
    assert weight.dtype == (FP8 if kept else torch.float32)  # auto on the CPU: upcast at load
    said = "float32, fp8 weights" if kept else "float32"
    assert [r.getMessage() for r in caplog.records if "model loaded" in r.getMessage()] == [
        f"model loaded: {model.name} (FLUX.1 dev, cpu, {said})"
    ]
    assert ("fp8 weights" in model_status_html(engine)) is kept


def test_fp8_storage_setting_auto_is_on_for_cuda_only() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert Settings().fp8_storage is Fp8Storage.AUTO
    assert Fp8Storage.AUTO.keeps_fp8(cuda) and not Fp8Storage.AUTO.keeps_fp8(cpu)
    assert Fp8Storage.ON.keeps_fp8(cpu) and Fp8Storage.ON.keeps_fp8(cuda)
    assert not Fp8Storage.OFF.keeps_fp8(cuda)
    args = app.build_parser().parse_args(["--fp8-storage", "on"])
    assert app.settings_from(args).fp8_storage is Fp8Storage.ON
    assert app.settings_from(app.build_parser().parse_args([])).fp8_storage is Fp8Storage.AUTO
