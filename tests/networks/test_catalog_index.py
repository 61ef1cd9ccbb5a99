"""The catalog index: entries from headers and sidecars, the on-disk cache, incremental refresh,
background hashes, previews. Expectations are worked out by hand from the fixture files."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from webui.arch import Arch
from webui.networks.format import TrainingFacts
from webui.networks.format.files import compute_hashes, read_header
from webui.networks.library import header_facts as header_facts_module
from webui.networks.library import index_cache
from webui.networks.library.catalog import NetworkCatalog
from webui.networks.library.catalog_index import CatalogIndex
from webui.networks.library.entries import HeaderFacts, NetworkEntry, SidecarFacts
from webui.networks.library.header_facts import trigger_words, variants_and_rank
from webui.networks.library.previews import preview_bytes, set_preview
from webui.networks.library.sidecars import CivitaiInfo, UserMetadata

ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
ATTN2_V = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"

# kohya's shape: {dataset folder: {caption tag: count}}; tags repeat across folders and may
# carry a leading space. Summed: inkwash 30, 1girl 15, scenery 8, monochrome 5.
KOHYA_TAG_FREQUENCY = {
    "10_inkwash": {"inkwash": 20, " 1girl": 12, "monochrome": 5},
    "5_background": {"inkwash": 10, "scenery": 8, "1girl": 3},
}
KOHYA_METADATA = {
    "ss_output_name": "inkwash_v2",
    "ss_base_model_version": "sd_v1",
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
    "ss_resolution": "(512, 512)",
    "ss_num_epochs": "10",
    "ss_num_train_images": "40",
    "ss_max_train_steps": "400",
    "ss_tag_frequency": json.dumps(KOHYA_TAG_FREQUENCY),
}
# civitai's model-version JSON, trimmed to the shape of a real download.
CIVITAI_INFO = {
    "id": 123456,
    "modelId": 654321,
    "name": "v2.0",
    "baseModel": "SD 1.5",
    "trainedWords": ["ink wash, sumi-e", "brush strokes", "Ink Wash"],
    "description": "<p>Second version.</p>",
    "model": {"name": "Inkwash", "type": "LORA", "description": "<p>Ink wash style.</p>"},
    "files": [{"name": "inkwash.safetensors", "hashes": {"AutoV2": "0123456789"}}],
    "images": [{"url": "https://example.invalid/1.jpeg", "nsfw": "None"}],
}
# A1111's edit dialog writes these keys; "negative text" and others it may add must survive.
A1111_USER_METADATA = {
    "description": "My ink style",
    "sd version": "SD1",
    "activation text": "inkwash style,  monochrome , ",
    "preferred weight": 0.7,
    "notes": "good at 0.7",
    "negative text": "color",
}


def lora_tensors(rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """Two SD1 cross-attention LoRA modules (context width 768)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix in (ATTN2_K, ATTN2_V):
        tensors[f"{prefix}.lora_down.weight"] = torch.zeros(rank, 768)
        tensors[f"{prefix}.lora_up.weight"] = torch.zeros(320, rank)
        tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
    return tensors


def write_lora(
    path: Path,
    metadata: dict[str, str] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors or lora_tensors(), str(path), metadata=metadata)
    return path


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def png_bytes(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def bump_mtime(path: Path, seconds: int = 10) -> None:
    """Move a file's mtime on so a change is seen even on coarse-clock file systems."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


COVER = png_bytes((10, 200, 10))
THUMB = png_bytes((10, 10, 200))


@pytest.fixture
def loras(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    ink = write_lora(root / "styles" / "inkwash.safetensors", KOHYA_METADATA)
    write_json(ink.with_name("inkwash.json"), A1111_USER_METADATA)
    write_json(ink.with_name("inkwash.civitai.info"), CIVITAI_INFO)
    ink.with_name("inkwash.preview.png").write_bytes(png_bytes())
    ink.with_name("inkwash.png").write_bytes(png_bytes((0, 0, 0)))  # loses to .preview.png

    hero = write_lora(root / "chars" / "hero.safetensors")
    write_json(hero.with_name("hero.civitai.info"), {"trainedWords": ["hero_v1, red cape"]})
    hero.with_name("hero.jpg").write_bytes(b"\xff\xd8 not really a jpeg")

    write_lora(
        root / "spec.safetensors",
        {
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.trigger_phrase": "spec_style",
            "modelspec.tags": "painting, oil",
            "modelspec.thumbnail": "data:image/png;base64," + b64(THUMB),
        },
    )
    write_lora(root / "covered.safetensors", {"ssmd_cover_images": json.dumps([b64(COVER)])})
    broken = write_lora(
        root / "broken_sidecar.safetensors",
        {"ss_tag_frequency": json.dumps({"1_x": {"a": 1, "b": 3, "c": 2}})},
    )
    broken.with_name("broken_sidecar.json").write_text("{not json", encoding="utf-8")
    truncate(write_lora(root / "truncated.safetensors"), 200)
    torch.save({"lora_unet_x.alpha": torch.tensor(1.0)}, root / "old.pt")
    (root / "notes.txt").write_text("not a network")
    (root / ".hidden").mkdir()
    write_lora(root / ".hidden" / "skipped.safetensors")
    return root


def by_name(index: CatalogIndex) -> dict[str, NetworkEntry]:
    return {e.name: e for e in index.entries()}


class CountingReads:
    """Counts header reads made by the index."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        monkeypatch.setattr(header_facts_module, "read_header", self._read)

    def _read(self, path: Path):  # type: ignore[no-untyped-def]
        self.paths.append(Path(path).name)
        return read_header(path)

    def take(self) -> list[str]:
        taken, self.paths = sorted(self.paths), []
        return taken


def test_kohya_file_with_all_sidecars(loras: Path) -> None:
    entry = by_name(CatalogIndex(loras, hash_in_background=False))["styles/inkwash"]
    assert entry == NetworkEntry(
        name="styles/inkwash",
        path=loras / "styles" / "inkwash.safetensors",
        folder="styles",
        alias="inkwash_v2",
        base=Arch.SD1,
        base_source="metadata ss_base_model_version",
        family="SD1",
        key_format="kohya",
        variants=("lora",),
        rank=4,
        alpha=2.0,
        size=entry.size,
        mtime=entry.mtime,
        training=TrainingFacts(
            base_checkpoint="v1-5-pruned-emaonly.safetensors",
            resolution="(512, 512)",
            epochs=10,
            images=40,
            steps=400,
        ),
        # summed over both dataset folders; the folder names are not tags
        tag_frequency=(("inkwash", 30), ("1girl", 15), ("scenery", 8), ("monochrome", 5)),
        trigger_words=("inkwash style", "monochrome"),  # the user's activation text wins
        preferred_weight=0.7,
        notes="good at 0.7",
        sd_version="SD1",
        description="My ink style",
        preview=loras / "styles" / "inkwash.preview.png",
        embedded_preview=False,
        error=None,
    )
    assert entry.size == (loras / "styles" / "inkwash.safetensors").stat().st_size


def test_listing_order_and_other_files(loras: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        entries = by_name(CatalogIndex(loras, hash_in_background=False))
    assert list(entries) == [
        "broken_sidecar",
        "chars/hero",
        "covered",
        "old",
        "spec",
        "styles/inkwash",
        "truncated",
    ]
    hero = entries["chars/hero"]
    assert (hero.trigger_words, hero.preview, hero.folder) == (
        ("hero_v1", "red cape"),
        loras / "chars" / "hero.jpg",
        "chars",
    )
    assert hero.description is None and hero.alias is None
    # no metadata: rank from the shapes, alpha read from the alpha tensors, base from the keys
    assert (hero.rank, hero.alpha, hero.base, hero.base_source) == (4, 2.0, Arch.SD1, "keys")

    spec = entries["spec"]
    assert (spec.base, spec.trigger_words, spec.embedded_preview, spec.preview) == (
        Arch.SDXL,
        ("spec_style", "painting", "oil"),
        True,
        None,
    )
    assert entries["covered"].embedded_preview

    broken = entries["broken_sidecar"]
    assert broken.error is None
    assert broken.trigger_words == ("b", "c", "a")  # top caption tags, the sidecar ignored
    assert any("broken_sidecar.json" in r.getMessage() for r in caplog.records)

    truncated = entries["truncated"]
    assert truncated.error is not None and truncated.error.startswith("truncated")
    assert truncated.variants == () and truncated.base is None

    old = entries["old"]  # a pickle holding only an alpha: readable, no known variant
    assert (old.error, old.variants, old.alpha, old.path.suffix) == (None, (), 1.0, ".pt")


def test_missing_folder_is_empty(tmp_path: Path) -> None:
    assert CatalogIndex(tmp_path / "nothere", tmp_path / "c.json").entries() == ()


@pytest.mark.parametrize(
    ("user", "civitai", "tags", "spec", "expected"),
    [
        (("mine",), ("civ",), (("tag", 3),), ("spec",), ("mine",)),
        ((), ("civ", "two"), (("tag", 3),), ("spec",), ("civ", "two")),
        (None, None, (("t1", 9), ("t2", 8), ("t3", 7), ("t4", 6), ("t5", 5), ("t6", 4)), (),
         ("t1", "t2", "t3", "t4", "t5")),
        (None, (), (), ("spec", "tag"), ("spec", "tag")),
        (None, None, (), (), ()),
    ],
)  # fmt: skip
def test_trigger_word_order(user, civitai, tags, spec, expected) -> None:  # type: ignore[no-untyped-def]
    header = HeaderFacts(tag_frequency=tags, spec_trigger_words=spec)
    side = SidecarFacts(
        user=UserMetadata(activation_text=user) if user is not None else None,
        civitai=CivitaiInfo(trained_words=civitai) if civitai is not None else None,
    )
    assert trigger_words(header, side) == expected


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ({"a.lora_down.weight": (8, 10), "a.lora_up.weight": (10, 8), "b.lora_down.weight": (8, 3),
          "c.lora_down.weight": (16, 3), "a.alpha": ()}, (("lora",), 8)),
        ({"a.lora_A.weight": (4, 10), "a.lora_B.weight": (10, 4)}, (("lora",), 4)),
        ({"a.hada_w1_a": (10, 2), "a.hada_w1_b": (2, 10), "a.dora_scale": (1, 10)},
         (("loha", "dora"), 2)),
        ({"a.lokr_w1": (2, 2), "a.lokr_w2_a": (5, 3), "a.lokr_w2_b": (3, 5)}, (("lokr",), 3)),
        ({"a.weight": (10,), "a.on_input": ()}, (("ia3",), None)),
        ({"a.weight": (10,)}, ((), None)),  # no on_input: the loader builds no IA3 from it
        ({"a.a1.weight": (2, 10), "a.a2.weight": (10, 2), "a.b1.weight": (2, 10),
          "a.b2.weight": (10, 2)}, (("glora",), None)),
        ({"a.oft_blocks": (4, 8, 8)}, (("oft",), None)),
        ({"a.oft_blocks": (2, 4, 8, 8)}, (("boft",), None)),
        ({"a.diff": (10, 10), "a.diff_b": (10,)}, (("full",), None)),
        ({"a.w_norm": (10,), "a.b_norm": (10,)}, (("norm",), None)),
        ({"a.lora_down.weight": (4, 10), "b.lokr_w1": (2, 2)}, (("lora", "lokr"), 4)),
    ],
)  # fmt: skip
def test_variants_and_rank(shapes, expected) -> None:  # type: ignore[no-untyped-def]
    assert variants_and_rank(shapes) == expected


def test_alpha_is_the_most_common(tmp_path: Path) -> None:
    tensors = lora_tensors(rank=8, alpha=8.0)
    tensors["lora_unet_extra.lora_down.weight"] = torch.zeros(16, 3)
    tensors["lora_unet_extra.alpha"] = torch.tensor(4.0, dtype=torch.float16)
    write_lora(tmp_path / "mixed.safetensors", tensors=tensors)
    entry = CatalogIndex(tmp_path, hash_in_background=False).entries()[0]
    assert (entry.rank, entry.alpha) == (8, 8.0)  # 8 twice, 16/4 once


def test_cache_hits_misses_and_incremental_refresh(
    loras: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = CountingReads(monkeypatch)
    cache = tmp_path / "cache" / "catalog.json"
    safetensors_names = sorted(
        p.name for p in loras.rglob("*.safetensors") if ".hidden" not in p.parts
    )

    cold = CatalogIndex(loras, cache, hash_in_background=False)
    cold_entries = cold.entries()
    assert reads.take() == safetensors_names  # each header once; the pickle is not opened
    assert cache.is_file()

    warm = CatalogIndex(loras, cache, hash_in_background=False)
    assert warm.entries() == cold_entries
    assert reads.take() == []
    cache_mtime = cache.stat().st_mtime_ns
    warm.refresh()
    assert reads.take() == []
    assert cache.stat().st_mtime_ns == cache_mtime  # nothing changed, nothing written

    # a changed file is re-read, a new one read, a deleted one dropped
    write_lora(loras / "chars" / "hero.safetensors", {"ss_output_name": "hero_final"})
    bump_mtime(loras / "chars" / "hero.safetensors")
    write_lora(loras / "new" / "fresh.safetensors")
    (loras / "covered.safetensors").unlink()
    warm.refresh()
    assert reads.take() == ["fresh.safetensors", "hero.safetensors"]
    entries = by_name(warm)
    assert "covered" not in entries and "new/fresh" in entries
    assert entries["chars/hero"].alias == "hero_final"

    # editing the user's sidecar or adding a preview re-reads the sidecars, not the header
    user_json = loras / "chars" / "hero.json"
    write_json(user_json, {"activation text": "caped hero", "preferred weight": 0.5})
    (loras / "new" / "fresh.preview.webp").write_bytes(b"RIFF....WEBP")
    warm.refresh()
    assert reads.take() == []
    entries = by_name(warm)
    assert entries["chars/hero"].trigger_words == ("caped hero",)
    assert entries["chars/hero"].preferred_weight == 0.5
    assert entries["new/fresh"].preview == loras / "new" / "fresh.preview.webp"
    write_json(user_json, {"activation text": "flying hero"})
    bump_mtime(user_json)
    warm.refresh()
    assert reads.take() == []
    assert by_name(warm)["chars/hero"].trigger_words == ("flying hero",)

    # a later process starts from the saved state
    again = CatalogIndex(loras, cache, hash_in_background=False)
    assert again.entries() == warm.entries()
    assert reads.take() == []


def test_unreadable_cache_means_a_cold_scan(loras: Path, tmp_path: Path) -> None:
    cache = tmp_path / "catalog.json"
    cache.write_text("{broken", encoding="utf-8")
    entries = CatalogIndex(loras, cache, hash_in_background=False).entries()
    assert len(entries) == 7
    assert json.loads(cache.read_text())["version"] == index_cache.CACHE_VERSION


def test_hashes_in_background_and_cached(loras: Path, tmp_path: Path) -> None:
    cache = tmp_path / "catalog.json"
    index = CatalogIndex(loras, cache)
    index.entries()
    assert index.wait_for_hashes(timeout=30)
    path = loras / "styles" / "inkwash.safetensors"
    expected = compute_hashes(path)
    entry = by_name(index)["styles/inkwash"]
    assert (entry.autov2, entry.autov3) == (expected.autov2, expected.autov3)
    truncated = by_name(index)["truncated"]  # unreadable files are not hashed
    assert (truncated.autov2, truncated.autov3) == (None, None)
    assert by_name(index)["old"].autov2 == compute_hashes(loras / "old.pt").autov2

    restarted = CatalogIndex(loras, cache, hash_in_background=False)
    restarted_entry = by_name(restarted)["styles/inkwash"]  # from the cache, not hashed again
    assert (restarted_entry.autov2, restarted_entry.autov3) == (expected.autov2, expected.autov3)


def test_preview_bytes_from_file_and_metadata(loras: Path) -> None:
    entries = by_name(CatalogIndex(loras, hash_in_background=False))
    assert preview_bytes(entries["styles/inkwash"]) == png_bytes()
    assert preview_bytes(entries["covered"]) == COVER  # ssmd_cover_images
    assert preview_bytes(entries["spec"]) == THUMB  # modelspec.thumbnail data URL
    assert preview_bytes(entries["old"]) is None


def test_set_preview_is_found_on_refresh(loras: Path) -> None:
    index = CatalogIndex(loras, hash_in_background=False)
    written = set_preview(by_name(index)["spec"], Image.new("RGB", (2, 2), (1, 2, 3)))
    assert written == loras / "spec.preview.png"
    index.refresh()
    spec = by_name(index)["spec"]
    assert spec.preview == written
    with Image.open(written) as image:
        assert image.getpixel((0, 0)) == (1, 2, 3)


def test_network_catalog_resolves_aliases_from_the_index(
    loras: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = NetworkCatalog(loras)

    def no_reads(path: Path) -> None:
        raise AssertionError(f"header of {path} read again")

    monkeypatch.setattr(header_facts_module, "read_header", no_reads)
    assert catalog.resolve("INKWASH_V2").name == "styles/inkwash"
    assert catalog.alias(catalog.resolve("chars/hero")) is None
    entry = catalog.entry(catalog.resolve("inkwash"))
    assert entry is not None and entry.trigger_words == ("inkwash style", "monochrome")


def test_shared_index(loras: Path) -> None:
    index = CatalogIndex(loras, hash_in_background=False)
    catalog = NetworkCatalog(loras, index=index)
    assert catalog.index is index
    assert [f.name for f in catalog.files] == [e.name for e in index.entries()]


def test_cache_with_damaged_tag_counts_means_a_cold_scan(loras: Path, tmp_path: Path) -> None:
    cache = tmp_path / "catalog.json"
    cold = CatalogIndex(loras, cache, hash_in_background=False).entries()
    data = json.loads(cache.read_text())
    tagged = [r for r in data["files"].values() if r["header"]["tags"]]
    assert tagged, "the fixture folder has a LoRA with ss_tag_frequency"
    tagged[0]["header"]["tag_counts"] = "1"  # fewer counts than tags
    cache.write_text(json.dumps(data))
    again = CatalogIndex(loras, cache, hash_in_background=False).entries()
    assert again == cold  # rebuilt from the files, not half-read from the damaged cache
    assert [tuple(e.tag_frequency) for e in again] == [tuple(e.tag_frequency) for e in cold]


class _NotAllowed:
    """A class `torch.load(weights_only=True)` refuses to unpickle."""


def test_pickled_networks_are_read_with_weights_only(tmp_path: Path) -> None:
    torch.save(lora_tensors(rank=8, alpha=4.0), tmp_path / "legacy.pt")
    torch.save({"state_dict": lora_tensors(rank=2, alpha=1.0)}, tmp_path / "nested.ckpt")
    torch.save({"lora_unet_x.alpha": _NotAllowed()}, tmp_path / "unsafe.pt")
    entries = by_name(CatalogIndex(tmp_path, hash_in_background=False))
    legacy, nested, unsafe = entries["legacy"], entries["nested"], entries["unsafe"]
    # SD1 from the 768-wide cross-attention keys, as for the same tensors in a safetensors file
    assert (legacy.variants, legacy.rank, legacy.alpha, legacy.base) == (
        ("lora",),
        8,
        4.0,
        Arch.SD1,
    )
    assert (nested.variants, nested.rank, nested.alpha) == (("lora",), 2, 1.0)
    assert unsafe.error is not None and "weights_only" in unsafe.error
    assert unsafe.variants == ()
