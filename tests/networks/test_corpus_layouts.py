"""Issues 16 and 18: the corpus of real-world key layouts (tests/corpus/) on full-size models built
on the `meta` device. Every SD1/SD2/SDXL layout resolves in full on its architecture with the right
base; every FLUX.1 layout lands in full on FLUX.1-dev's transformer and encoders (fused BFL weights
as row pieces of the split modules); the BFL control LoRA is refused; every other family is named
and never written, on SD1, SD2, SDXL and FLUX.1, under every backend."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections import Counter
from pathlib import Path

import pytest
import torch
from corpus_layouts import Layout, corpus, meta_model
from safetensors.torch import save_file

from webui import families
from webui.arch import Arch
from webui.engine.lora_backends import LoraBackends
from webui.engine.merge import MergeError, check_bases
from webui.engine.network_set import ChosenNetwork
from webui.networks.apply.keys import KeyMap
from webui.networks.apply.planning import _piece_module
from webui.networks.apply.strengths import Strengths
from webui.networks.format.base_detection import detect_base, fits
from webui.networks.format.files import NetworkFileError
from webui.networks.format.modules import group_by_module, parse_module
from webui.networks.format.network import Network, read_network
from webui.settings import LoraBackend

SD = [x for x in corpus() if x.runs and not x.is_flux]
FLUX = [x for x in corpus() if x.is_flux]
OTHER = [x for x in corpus() if not x.runs]
CONTROL = "flux-control-lora-format"


def _marks(layout: Layout) -> list[pytest.MarkDecorator]:
    return [pytest.mark.xfail(reason=layout.xfail, strict=True)] if layout.xfail else []


def _params(layouts: list[Layout], naming: bool = True) -> list:
    return [pytest.param(x, id=x.name, marks=_marks(x) if naming else []) for x in layouts]


def _tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.full((), 2.0) if s == () else torch.zeros(s) for k, s in shapes.items()}


def _shaped(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """`_tensors` without the memory: zeros of each shape as views of one zero (a full diff
    layout is ~1 G values); only for parsing and resolving, which read shapes and dtypes."""
    zero = torch.zeros(())
    return {k: torch.full((), 2.0) if s == () else zero.expand(s) for k, s in shapes.items()}


def test_corpus_size_and_sources() -> None:
    """The issue's floor: 30 SD layouts from 6 trainers, 15 of other families (FLUX.1 among them
    when the floor was set), each cited."""
    assert len(SD) >= 30 and len({x.trainer for x in SD}) >= 6
    assert len(OTHER) + len(FLUX) >= 15 and len(FLUX) >= 8
    assert all(x.source and x.trainer and x.keys for x in corpus())
    assert Counter(x.family for x in SD).keys() == {"SD1", "SD2", "SDXL"}


@pytest.mark.parametrize("layout", _params(SD))
def test_sd_layout_applies_in_full_with_its_base(layout: Layout) -> None:
    arch = Arch(layout.family)
    detection = detect_base(layout.metadata, layout.keys)
    assert detection.arch is arch, detection.detail
    model = meta_model(arch)
    keymap = KeyMap(model.unet, model.text_encoder, model.text_encoder_2)
    groups = group_by_module(_shaped(layout.keys))
    for prefix, tensors in groups.items():
        module = parse_module(prefix, tensors)
        ref = keymap.resolve(prefix)
        assert ref is not None, f"{prefix} matches nothing"
        assert module.accepts(ref.module.weight.shape), prefix
    used = sum(len(g) for g in groups.values())
    embeddings = sum(1 for k in layout.keys if k.startswith("bundle_emb."))
    assert used + embeddings == len(layout.keys)  # every key used


@pytest.mark.parametrize("layout", _params([x for x in FLUX if x.name != CONTROL]))
def test_flux_layout_applies_in_full_with_its_base(layout: Layout) -> None:
    """Every module lands on FLUX.1-dev: split modules whole, fused BFL weights (qkv, linear1,
    the final modulation) as row pieces that cover every row exactly once."""
    detection = detect_base(layout.metadata, layout.keys)
    assert detection.arch is Arch.FLUX1, detection.detail
    model = meta_model(Arch.FLUX1)
    keymap = KeyMap(model.transformer, model.text_encoder, model.text_encoder_2)
    groups = group_by_module(_shaped(layout.keys))
    for prefix, tensors in groups.items():
        module = parse_module(prefix, tensors)
        pieces = keymap.pieces(prefix)
        assert pieces, f"{prefix} matches nothing"
        for piece in pieces:
            target = _piece_module(module, piece)
            assert target.accepts(piece.ref.module.weight.shape), (prefix, piece.ref.path)
        fused = [r for p in pieces if p.rows for r in p.rows]
        if fused:  # the pieces take every row of the fused weight once
            assert sorted(fused)[0][0] == 0 and sum(b - a for a, b in fused) == pieces[0].fused_rows
    assert sum(len(g) for g in groups.values()) == len(layout.keys)  # every key used


@pytest.mark.parametrize("layout", _params(FLUX))
def test_flux_layout_fits_no_sd_model(layout: Layout) -> None:
    """Whatever its detection, a FLUX.1 layout is never written on SD1, SD2 or SDXL."""
    detection = detect_base(layout.metadata, layout.keys)
    assert not any(fits(detection, arch) for arch in Arch if arch is not Arch.FLUX1)


def test_flux_control_lora_is_refused_in_one_sentence() -> None:
    layout = next(x for x in FLUX if x.name == CONTROL)
    detection = detect_base(layout.metadata, layout.keys)
    assert detection.arch is None and detection.foreign
    assert "128 input channels" in detection.detail
    assert not any(fits(detection, arch) for arch in Arch)
    sentence = detection.refusal("depth.safetensors")
    assert sentence is not None and sentence.startswith("depth.safetensors is a FLUX.1 control")


@pytest.fixture(scope="module")
def networks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Network | NetworkFileError]:
    """Each other-family layout as a real file, read once (or the loader's refusal: some listings
    record factor shapes that contradict each other, and the loader refuses those files)."""
    folder = tmp_path_factory.mktemp("other")
    out: dict[str, Network | NetworkFileError] = {}
    for layout in OTHER:
        path = folder / f"{layout.name}.safetensors"
        save_file(_tensors(layout.keys), path, metadata=layout.metadata or None)
        try:
            out[layout.name] = read_network(path)
        except NetworkFileError as error:
            out[layout.name] = error
    return out


@pytest.mark.parametrize("layout", _params(OTHER))
def test_other_family_is_named_and_fits_no_model(layout: Layout) -> None:
    detection = detect_base(layout.metadata, layout.keys)
    assert (detection.family, detection.arch) == (layout.family, None), detection.detail
    assert not any(fits(detection, arch) for arch in (*Arch, None))


@pytest.mark.parametrize("choice", list(LoraBackend), ids=lambda c: c.value)
@pytest.mark.parametrize("arch", list(Arch), ids=lambda a: a.value)
@pytest.mark.parametrize("layout", _params(OTHER, naming=False))
def test_other_family_never_written(
    layout: Layout,
    arch: Arch,
    choice: LoraBackend,
    networks: dict[str, Network],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    network = networks[layout.name]
    if isinstance(network, NetworkFileError):
        assert "malformed module" in str(network)  # refused when read: no backend can see it
        return
    if layout.xfail and not network.base.foreign:
        pytest.xfail(layout.xfail)
    model = meta_model(arch)
    denoiser = model.unet if model.unet is not None else model.transformer
    components = [c for c in (denoiser, model.text_encoder, model.text_encoder_2) if c]
    before = {n: p for c in components for n, p in c.named_parameters()}
    backends = LoraBackends(model, arch)
    handed: list[Network] = []
    for backend in (backends.native, backends.fallback):
        original = backend.apply
        monkeypatch.setattr(
            backend,
            "apply",
            lambda pairs, _o=original, **kw: (handed.extend(n for n, _ in pairs), _o(pairs, **kw))[
                1
            ],
        )
    routed = backends.apply([ChosenNetwork(network.name, network, Strengths())], choice)
    assert handed == []  # neither the patcher nor diffusers ever sees it
    after = {n: p for c in components for n, p in c.named_parameters()}
    assert all(after[n] is before[n] for n in before)
    assert routed.report.modules_changed == 0 and not routed.applied
    family = network.base.family or ""  # the naming itself is test_other_family_is_named_...
    refusal = f"{network.path.name} is {'an' if family[0] in 'AEIOUS' else 'a'} {family} LoRA ("
    assert len(routed.report.warnings) == 1
    assert routed.report.warnings[0].startswith(refusal)
    assert routed.report.warnings[0].endswith(f"this app runs {families.RUN_NAMES} models")


@pytest.mark.parametrize("arch", list(Arch), ids=lambda a: a.value)
def test_merge_never_bakes_another_family(arch: Arch, networks: dict) -> None:
    """Merging checks `fits`: another family's CLIP-like part would otherwise be baked into SD1."""
    network = networks["anima-lora-kohya-format"]
    assert isinstance(network, Network)
    with pytest.raises(MergeError, match=r"is an Anima LoRA \(kohya format\)"):
        check_bases([network], arch, "model.safetensors")


def test_every_listing_file_is_named_for_its_family() -> None:
    for path in Path(__file__).parents[1].joinpath("corpus").glob("*/*.json"):
        assert path.parent.name in {"sd1", "sd2", "sdxl"} or not path.stem.startswith("sd")
