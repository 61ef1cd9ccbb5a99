"""The native patcher against the trainers' own merges, on whole tiny SD1 and SDXL pipelines.

One table of formats, one parametrized test: every variant LyCORIS writes (through its own kohya
network and `save_weights`), in diffusers-style and original-style names, and diffusers' PEFT
LoRA files, at two strengths. The reference weights come from the trainer's code: each LyCORIS
module's `merge_to(multiplier)`, or diffusers' `load_lora_weights` + `fuse_lora(lora_scale=s)`.
"""

from __future__ import annotations

import copy
import types
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from lora_files import (
    BASE_MODEL_VERSION,
    file_prefixes,
    lycoris_preset,
    lycoris_wrapped,
    one_torch_thread,
    rename_to_ldm,
    write_lycoris,
    write_peft,
)
from lycoris.kohya import LycorisNetworkKohya
from pipeline_copies import pipeline_copy
from safetensors import safe_open
from torch import Tensor

from webui.arch import Arch
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.networks.apply.patcher import NetworkPatcher
from webui.networks.format.network import load_network

COMPONENTS = ("text_encoder", "text_encoder_2", "unet")
STRENGTHS = (1.0, 0.7)


class Naming(StrEnum):
    DIFFUSERS = "diffusers"  # lora_unet_down_blocks_0_attentions_0_proj_in, as LyCORIS writes
    ORIGINAL = "original"  # lora_unet_input_blocks_1_1_proj_in


class Writer(StrEnum):
    LYCORIS = "lycoris"
    PEFT = "peft"


@dataclass(frozen=True)
class Row:
    """One format: how the trainer writes it, and what our loader must make of it."""

    name: str
    variants: tuple[str, ...]
    writer: Writer = Writer.LYCORIS
    algo: str = "lora"
    options: Mapping[str, Any] = field(default_factory=dict)  # create_network kwargs
    preset: Mapping[str, Any] = field(default_factory=dict)  # overrides of our preset
    must_contain: tuple[str, ...] = ()  # key suffixes proving the row writes what it claims
    # LyCORIS 4.1.3's LoHa/LoKr merge_to applies alpha/rank twice (get_weight scales, then
    # get_diff_weight scales again) while their training forward applies it once: those rows
    # merge with get_diff_weight replaced by the forward's weight, get_weight·scalar·m.
    forward_reference: bool = False


ROWS: tuple[Row, ...] = (
    Row("lora", ("lora",), preset={"enable_conv": False}),
    Row("locon", ("lora",), algo="locon", options={"conv_dim": 8, "conv_alpha": 2}),
    Row("lora tucker", ("lora",), options={"use_tucker": True}, must_contain=("lora_mid.weight",)),
    Row("dora", ("lora",), options={"dora_wd": True}, must_contain=("dora_scale",)),
    Row(
        "dora on input",
        ("lora",),
        options={"dora_wd": True, "wd_on_output": False},
        must_contain=("dora_scale",),
    ),
    Row("loha", ("loha",), algo="loha", forward_reference=True),
    Row(
        "loha tucker",
        ("loha",),
        algo="loha",
        options={"use_tucker": True},
        must_contain=("hada_t1", "hada_t2"),
        forward_reference=True,
    ),
    Row("lokr", ("lokr",), algo="lokr", must_contain=("lokr_w2_a",), forward_reference=True),
    Row(
        "lokr decompose both",
        ("lokr",),
        algo="lokr",
        options={"decompose_both": True},
        must_contain=("lokr_w1_a",),
        forward_reference=True,
    ),
    Row(
        "lokr tucker",
        ("lokr",),
        algo="lokr",
        options={"use_tucker": True},
        must_contain=("lokr_t2",),
        forward_reference=True,
    ),
    Row("glora", ("glora",), algo="glora", must_contain=("a1.weight",)),
    Row("diag-oft", ("oft",), algo="diag-oft", must_contain=("oft_blocks",)),
    Row("boft", ("boft",), algo="boft", must_contain=("oft_blocks",)),
    Row("full", ("full",), algo="full", must_contain=("diff", "diff_b")),
    Row("ia3", ("ia3",), algo="ia3", must_contain=("on_input",)),
    Row("norm", ("lora", "norm"), options={"train_norm": True}, must_contain=("w_norm",)),
    Row("peft", ("lora",), writer=Writer.PEFT, must_contain=("lora_A.weight",)),
)

CASES = [
    pytest.param(row, arch, naming, strength, id=f"{row.name}-{arch.value}-{naming}-{strength}")
    for row in ROWS
    for arch in (Arch.SD1, Arch.SDXL)
    for naming in (Naming.DIFFUSERS, Naming.ORIGINAL)
    if row.writer is Writer.LYCORIS or naming is Naming.DIFFUSERS
    for strength in STRENGTHS
]


def live_weights(pipe: Any) -> dict[str, Tensor]:
    """Every text-encoder and UNet tensor (sharing the model's storage), by `component.key`;
    PEFT wrappers are read through to their base layers."""
    weights: dict[str, Tensor] = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for key, tensor in model.state_dict().items():
            if ".lora_" in key:
                continue  # PEFT's adapter tensors, not model weights
            weights[f"{component}.{key.replace('.base_layer.', '.')}"] = tensor
    return weights


@cache
def base_pipeline(arch: Arch) -> DiffusionPipeline:
    torch.manual_seed(0)
    return build_pipeline(ModelSpec(arch))


@cache
def base_weights(arch: Arch) -> dict[str, Tensor]:
    return {key: t.clone() for key, t in live_weights(base_pipeline(arch)).items()}


def changed(weights: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
    """The tensors that differ from the base model's, copied."""
    base = base_weights(arch)
    assert set(weights) == set(base)
    return {k: t.clone() for k, t in weights.items() if not torch.equal(t, base[k])}


@torch.no_grad()
def reset(pipe: Any, arch: Arch, keys: Iterable[str]) -> None:
    """Copy the base model's values back into `keys` (cheaper than reloading everything)."""
    live, base = live_weights(pipe), base_weights(arch)
    for key in keys:
        live[key].copy_(base[key])


def components_copy(arch: Arch) -> types.SimpleNamespace:
    """Deep copies of the text encoder(s) and UNet (no VAE: LoRAs do not touch it)."""
    pipe = base_pipeline(arch)
    return types.SimpleNamespace(
        **{c: copy.deepcopy(getattr(pipe, c)) for c in COMPONENTS if hasattr(pipe, c)}
    )


@cache
def lycoris_target(arch: Arch) -> types.SimpleNamespace:
    """The model every row's LyCORIS network wraps; at base between merges."""
    return components_copy(arch)


def _forward_diff_weight(
    self: Any, multiplier: float = 1, shape: Any = None, device: Any = None
) -> tuple[Tensor, None]:
    """LoHa/LoKr ΔW as their training forward applies it: alpha/rank once (see Row)."""
    diff = self.get_weight(shape) * self.scalar * multiplier
    return (diff if device is None else diff.to(device)), None


@dataclass
class Written:
    """One row's file(s) on one architecture, and the trainer's changed weights per strength."""

    files: dict[Naming, Path]
    renames: dict[str, str]  # diffusers-style prefix -> original-style prefix
    wrapped: set[str]  # diffusers-style prefixes the trainer wrapped
    network: LycorisNetworkKohya | None = None
    references: dict[float, dict[str, Tensor]] = field(default_factory=dict)


_written: dict[tuple[str, Arch], Written] = {}


def written(row: Row, arch: Arch, directory: Path) -> Written:
    key = (row.name, arch)
    if key not in _written:
        torch.manual_seed(zlib.crc32(f"{row.name}-{arch.value}".encode()))
        if row.writer is Writer.PEFT:
            pipe = pipeline_copy(base_pipeline(arch))
            path = write_peft(pipe, directory)
            prefixes = {prefix for prefix, _ in file_keys(path, row.writer)}
            _written[key] = Written({Naming.DIFFUSERS: path}, {}, prefixes)
        else:
            _written[key] = _write_lycoris(row, arch, directory)
    return _written[key]


def _write_lycoris(row: Row, arch: Arch, directory: Path) -> Written:
    target = lycoris_target(arch)
    path = directory / "diffusers.safetensors"
    metadata = {"ss_base_model_version": BASE_MODEL_VERSION[arch]}
    with lycoris_preset(**row.preset) as preset:
        network = write_lycoris(
            target, path, preset=preset, algo=row.algo, metadata=metadata, **row.options
        )
    if row.forward_reference:
        for lora in network.loras:
            lora.get_diff_weight = types.MethodType(_forward_diff_weight, lora)
    renames = rename_to_ldm(target.unet, path, directory / "original.safetensors")
    files = {Naming.DIFFUSERS: path, Naming.ORIGINAL: directory / "original.safetensors"}
    assert set(lycoris_wrapped(network)) == file_prefixes(path)
    return Written(files, renames, file_prefixes(path), network)


@torch.no_grad()
def reference(arch: Arch, written: Written, strength: float) -> dict[str, Tensor]:
    """The weights the trainer's own code changes, and their values, at `strength`."""
    if strength in written.references:
        return written.references[strength]
    if written.network is None:
        pipe = pipeline_copy(base_pipeline(arch))
        pipe.load_lora_weights(str(written.files[Naming.DIFFUSERS]))
        components = [c for c in COMPONENTS if getattr(pipe, c, None) is not None]
        pipe.fuse_lora(components=components, lora_scale=strength)
        weights = changed(live_weights(pipe), arch)
    else:
        target = lycoris_target(arch)
        assert not changed(live_weights(target), arch), "the reference model is not at base"
        for lora in written.network.loras:
            lora.merge_to(strength)  # writes into the wrapped layers
        weights = changed(live_weights(target), arch)
        reset(target, arch, weights)
    written.references[strength] = weights
    return weights


def file_keys(path: Path, writer: Writer) -> set[tuple[str, str]]:
    """(module prefix, tensor suffix) of every key, split the way the writer joined them."""
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    if writer is Writer.PEFT:  # unet.down_blocks.0.attentions.0.proj_in.lora_A.weight
        return {(k.rsplit(".", 2)[0], ".".join(k.rsplit(".", 2)[1:])) for k in keys}
    return {tuple(k.split(".", 1)) for k in keys}  # type: ignore[misc]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def working() -> dict[Arch, types.SimpleNamespace]:
    """One model per architecture for the patcher; each case resets what it changed."""
    return {arch: components_copy(arch) for arch in (Arch.SD1, Arch.SDXL)}


@pytest.mark.parametrize(("row", "arch", "naming", "strength"), CASES)
def test_patched_weights_match_the_trainer(
    row: Row,
    arch: Arch,
    naming: Naming,
    strength: float,
    working: dict[Arch, types.SimpleNamespace],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    files = written(
        row, arch, tmp_path_factory.mktemp(f"{row.name}-{arch.value}".replace(" ", "-"))
    )
    path = files.files[naming]
    prefixes = {prefix for prefix, _ in file_keys(path, row.writer)}
    if naming is Naming.ORIGINAL:
        assert prefixes == {files.renames.get(p, p) for p in files.wrapped}
        assert any(p.startswith("lora_unet_input_blocks_") for p in prefixes)
        assert any(p.startswith("lora_unet_output_blocks_") for p in prefixes)
    suffixes = {suffix for _, suffix in file_keys(path, row.writer)}
    for wanted in row.must_contain:
        assert wanted in suffixes, f"{row.name}: the trainer wrote no {wanted}"
    network = load_network(path)

    model = working[arch]
    report = NetworkPatcher(model, arch).apply([(network, strength)])
    got = changed(live_weights(model), arch)
    reset(model, arch, got)

    (net_report,) = report.networks
    assert set(net_report.matched) == prefixes
    assert net_report.unmatched == ()
    assert net_report.unsupported == ()
    assert net_report.shape_mismatch == ()
    assert net_report.variants == row.variants
    assert net_report.base is arch
    assert net_report.compatible and net_report.applied
    assert report.modules_changed == len(prefixes)
    assert report.warnings == []

    want = reference(arch, files, strength)
    assert want, "vacuous: the trainer's merge changed nothing"
    assert set(got) == set(want)  # every other tensor is bit-identical to the base model's
    bad = []
    for key, expected in want.items():
        tolerance = 1e-5 * expected.abs().max().item()
        if not torch.allclose(got[key], expected, rtol=1e-5, atol=tolerance):
            error = (got[key] - expected).abs().max().item()
            bad.append(f"{key}: max error {error:.3g} (scale {expected.abs().max().item():.3g})")
    assert not bad, f"{len(bad)} weight(s) differ from the trainer's:\n" + "\n".join(bad[:10])
