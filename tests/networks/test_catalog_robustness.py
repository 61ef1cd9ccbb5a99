"""The catalog scan is total: a hostile or broken file in `loras/` (or a corrupt cache) marks
itself broken, with a reason its card shows, and never stops the scan. Bad values inside an
otherwise good file (non-finite numbers, wrong types) are ignored, not fatal."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import tempfile
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from webui.networks.format.files import NetworkFileError, load_tensors, read_header
from webui.networks.library import sidecars
from webui.networks.library.catalog_index import CatalogIndex
from webui.networks.library.entries import UNEXPECTED_ERROR, NetworkEntry

ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
DEEP = 100_000


def _tensors(alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    tensors = {
        f"{ATTN2_K}.lora_down.weight": torch.zeros(4, 768),
        f"{ATTN2_K}.lora_up.weight": torch.zeros(320, 4),
    }
    if alpha is not None:
        tensors[f"{ATTN2_K}.alpha"] = alpha
    return tensors


def _lora(path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(_tensors(torch.tensor(2.0)), str(path), metadata=metadata)


def _raw_safetensors(path: Path, header_json: str) -> None:
    """A safetensors file whose header is exactly `header_json` (no tensor data)."""
    raw = header_json.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def _pickle(path: Path, state: object) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getvalue())


def _scan(folder: Path, cache: Path | None = None) -> dict[str, NetworkEntry]:
    index = CatalogIndex(folder, cache, hash_in_background=False)
    return {entry.name: entry for entry in index.entries()}


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """One good file and one of each hostile case from the bug report."""
    root = tmp_path / "loras"
    _lora(root / "good.safetensors", {"ss_network_alpha": "2.0", "ss_num_epochs": "3"})
    # values that are wrong but leave the file usable
    _lora(
        root / "inf_count.safetensors",
        {"ss_tag_frequency": '{"d": {"inf": 1e999, "ok": 3, "neg": -4, "nan": NaN}}'},
    )
    _lora(root / "deep_tags.safetensors", {"ss_tag_frequency": "[" * DEEP + "]" * DEEP})
    _lora(
        root / "huge_tag_int.safetensors", {"ss_tag_frequency": '{"d": {"a": 1' + "0" * 5000 + "}}"}
    )
    _lora(root / "tags_list.safetensors", {"ss_tag_frequency": '["a", {"b": "7"}, 3]'})
    _lora(
        root / "bad_numbers.safetensors",
        {"ss_network_alpha": "nan", "ss_num_epochs": "1e999", "ss_network_dim": "-inf"},
    )
    _lora(root / "deep_cover.safetensors", {"ssmd_cover_images": "[" * DEEP + "]" * DEEP})
    # files that cannot be read at all
    _raw_safetensors(
        root / "deep_header.safetensors", '{"__metadata__": ' + "[" * DEEP + "]" * DEEP + "}"
    )
    _raw_safetensors(
        root / "huge_int_header.safetensors",
        '{"t": {"dtype": "F32", "shape": [1' + "0" * 5000 + '], "data_offsets": [0, 0]}}',
    )
    (root / "garbage.pt").write_bytes(b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01" * 3)
    # a pickle with complex and non-finite alphas: readable, with no usable alpha
    _pickle(
        root / "complex_alpha.pt",
        {
            **_tensors(),
            f"{ATTN2_K}.alpha": torch.tensor(1 + 2j),
            "x.alpha": torch.tensor(float("inf")),
        },
    )
    # sidecars with hostile numbers and nesting
    (root / "good.json").write_text('{"notes": ' + "[" * DEEP + "]" * DEEP + "}")
    (root / "inf_count.json").write_text('{"preferred weight": 1e999, "notes": "n"}')
    (root / "good.civitai.info").write_text('{"trainedWords": ["w"], "x": 1' + "0" * 5000 + "}")
    return root


def test_hostile_files_are_listed_and_never_stop_the_scan(hostile: Path) -> None:
    entries = _scan(hostile)
    assert set(entries) == {
        p.stem for p in hostile.iterdir() if p.suffix in (".safetensors", ".pt")
    }

    broken = {name: entry.error for name, entry in entries.items() if entry.error}
    assert set(broken) == {"deep_header", "huge_int_header", "garbage"}
    assert "header JSON" in broken["deep_header"]
    assert "header JSON" in broken["huge_int_header"]
    assert "pickle" in broken["garbage"]
    assert not any(reason.startswith(UNEXPECTED_ERROR) for reason in broken.values())

    good = entries["good"]
    assert (good.alpha, good.training.epochs, good.rank) == (2.0, 3, 4)
    assert good.notes == ""  # the broken user sidecar is ignored whole
    assert good.trigger_words == ()  # civitai's sidecar holds a 5,000-digit number: ignored whole
    assert entries["inf_count"].notes == "n"
    assert entries["inf_count"].preferred_weight is None  # 1e999 is no weight
    # only the finite, positive, integral count survives
    assert tuple(entries["inf_count"].tag_frequency) == (("ok", 3),)
    for name in ("deep_tags", "huge_tag_int", "tags_list"):
        assert tuple(entries[name].tag_frequency) == ()
    odd = entries["bad_numbers"]
    assert odd.training.epochs is None
    assert odd.alpha == 2.0  # nan metadata falls back to the alpha tensor
    assert odd.rank == 4
    assert entries["deep_cover"].embedded_preview is False
    assert entries["complex_alpha"].alpha is None
    assert entries["complex_alpha"].rank == 4


def test_a_warm_start_keeps_every_record_of_a_hostile_folder(
    hostile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "catalog.json"
    cold = _scan(hostile, cache)

    read: list[Path] = []
    monkeypatch.setattr("webui.networks.library.header_facts.header_facts", read.append)
    assert _scan(hostile, cache) == cold
    assert read == []  # no cached record was dropped, so no file was read again


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff garbage",
        ("[" * DEEP + "]" * DEEP).encode(),
        b'{"version": 2, "files": 3}',
        b"[1, 2]",
        b'{"version": 2, "folder": "FOLDER", "files": {"good.safetensors": {"size": "x"}}}',
    ],
    ids=["bytes", "deep", "files-not-object", "list", "wrong-types"],
)
def test_a_corrupt_cache_is_ignored(hostile: Path, tmp_path: Path, content: bytes) -> None:
    cache = tmp_path / "catalog.json"
    cache.write_bytes(content.replace(b"FOLDER", str(hostile).encode()))
    assert _scan(hostile, cache) == _scan(hostile)


def test_a_cache_record_of_wrong_types_is_reread(hostile: Path, tmp_path: Path) -> None:
    cache = tmp_path / "catalog.json"
    expected = _scan(hostile, cache)
    data = json.loads(cache.read_text())
    record = data["files"]["good.safetensors"]
    record["header"]["alpha"] = "2.0"  # a string where a number belongs
    record["header"]["variants"] = "lora"  # a string where a list belongs
    data["files"]["inf_count.safetensors"]["header"]["tags"] = 7
    cache.write_text(json.dumps(data))
    assert _scan(hostile, cache) == expected


# -- property: any garbage, any metadata --------------------------------------------------------

METADATA_KEYS = (
    "ss_tag_frequency",
    "ss_network_alpha",
    "ss_network_dim",
    "ss_num_epochs",
    "ss_epoch",
    "ss_steps",
    "ss_output_name",
    "ss_base_model_version",
    "ss_v2",
    "modelspec.architecture",
    "modelspec.trigger_phrase",
    "modelspec.tags",
    "modelspec.thumbnail",
    "ssmd_cover_images",
)
NUMBERS = st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-3", "0", "1" + "0" * 5000])
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)
METADATA_VALUE = st.one_of(
    st.text(max_size=20),
    NUMBERS,
    JSON_VALUES.map(json.dumps),
    JSON_VALUES,  # not a string at all: against the format, still must not break the scan
    st.integers(min_value=1, max_value=2000).map(
        lambda depth: "[" * depth * 100 + "]" * depth * 100
    ),
)


@st.composite
def network_files(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["bytes", "safetensors", "mutated", "pickle"]))
    if kind == "bytes":
        return draw(st.sampled_from([".safetensors", ".pt", ".ckpt"])), draw(
            st.binary(max_size=300)
        )
    metadata = draw(st.dictionaries(st.sampled_from(METADATA_KEYS), METADATA_VALUE, max_size=5))
    header = {
        "__metadata__": metadata,
        "t.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
    }
    alpha = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
    data = json.dumps(header).encode()
    good = struct.pack("<Q", len(data)) + data + struct.pack("<f", alpha)
    if kind == "safetensors":
        return ".safetensors", good
    if kind == "mutated":
        raw = bytearray(good)
        for position, value in draw(
            st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=6)
        ):
            raw[position] = value
        return ".safetensors", bytes(raw[: draw(st.integers(0, len(raw)))])
    buffer = io.BytesIO()
    value = draw(st.sampled_from([1 + 2j, float("nan"), "x", None, [1], 3]))
    state = {"a.lora_down.weight": torch.zeros(2, 3), "a.alpha": value}
    if draw(st.booleans()):
        state["b.alpha"] = torch.tensor(draw(st.sampled_from([1 + 2j, float("inf"), True, 2])))
    torch.save(state, buffer)
    raw = buffer.getvalue()
    return ".pt", raw[: draw(st.integers(len(raw) // 2, len(raw)))]


SIDECAR = st.one_of(st.binary(max_size=60), JSON_VALUES.map(json.dumps), NUMBERS)


@settings(max_examples=40)
@given(files=st.lists(st.tuples(network_files(), SIDECAR, SIDECAR), min_size=1, max_size=5))
def test_any_folder_scans_completely(
    files: list[tuple[tuple[str, bytes], str | bytes, str | bytes]],
) -> None:
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp) / "loras"
        root.mkdir()
        for number, ((suffix, data), user, civitai) in enumerate(files):
            path = root / f"n{number}{suffix}"
            path.write_bytes(data)
            for sidecar, content in (
                (sidecars.user_metadata_path(path), user),
                (sidecars.civitai_info_path(path), civitai),
            ):
                sidecar.write_bytes(content if isinstance(content, bytes) else content.encode())
            # the readers raise only our error type
            for read in (read_header, load_tensors):
                with contextlib.suppress(NetworkFileError):
                    read(path)
        cache = Path(temp) / "catalog.json"
        entries = _scan(root, cache)
        assert len(entries) == len(files)
        for entry in entries.values():
            assert entry.error is None or (
                entry.error and not entry.error.startswith(UNEXPECTED_ERROR)
            )
        assert _scan(root, cache) == entries  # and the cache it wrote reads back the same


def test_scan_time_grows_linearly_with_hostile_files(tmp_path: Path) -> None:
    def folder(count: int) -> Path:
        root = tmp_path / f"loras-{count}"
        root.mkdir()
        for number in range(count):
            deep = "[" * DEEP + "]" * DEEP
            tags = json.dumps({"d": {f"tag{i}": i + 1 for i in range(2000)}})
            _lora(
                root / f"t{number}.safetensors",
                {"ss_tag_frequency": tags, "ssmd_cover_images": deep},
            )
            _raw_safetensors(root / f"d{number}.safetensors", '{"__metadata__": ' + deep + "}")
        return root

    def scan_seconds(root: Path) -> float:
        start = time.perf_counter()
        _scan(root)
        return time.perf_counter() - start

    small, large = folder(4), folder(16)
    scan_seconds(small)  # warm up imports and caches
    ratio = scan_seconds(large) / scan_seconds(small)
    assert ratio < 12, f"4x the files took {ratio:.1f}x the time"
