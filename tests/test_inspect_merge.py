"""`app.py inspect-lora` and `app.py merge`: the merged weights, loaded back by plain diffusers,
equal the patcher's on the same model; inspection reads a LyCORIS-written file right; bad inputs
get one-line errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from app_in_process import run_app
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from lora_files import (
    BASE_MODEL_VERSION,
    file_prefixes,
    register_preset,
    write_kohya_layers,
    write_lycoris,
)
from safetensors import safe_open
from safetensors.torch import save_file

from webui.arch import Arch
from webui.engine.checkpoints import (
    CONFIGS_METADATA_KEY,
    LoadedModel,
    checkpoint_from_path,
    load_checkpoint,
)
from webui.engine.merge import MERGE_METADATA_KEY, MergeError, merge_checkpoint
from webui.engine.model_factory import ModelSpec, build_pipeline, config_folder
from webui.networks.apply import model_check
from webui.networks.apply.patcher import NetworkPatcher
from webui.networks.format.inspection import format_text, inspect_network
from webui.networks.format.network import load_network

CPU = torch.device("cpu")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def load(path: Path) -> LoadedModel:
    return load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)


def write_kohya_lora(
    pipe: DiffusionPipeline, arch: Arch, path: Path, *, seed: int, every: int = 1
) -> Path:
    """A kohya LoRA (LoCon: convs too) with random up and down for every `every`-th Linear/Conv2d
    of the UNet and text encoder(s), rank 4, alpha 2."""
    metadata = {"ss_base_model_version": BASE_MODEL_VERSION[arch]}
    write_kohya_layers(
        path,
        pipe,
        arch,
        every=every,
        seed=seed,
        std=0.1,
        unet_first=True,
        drop_text_model=True,
        metadata=metadata,
    )
    return path


def diffusers_config_folder(checkpoint: Path, arch: Arch, folder: Path) -> Path:
    """configs/<arch> with the file's embedded component configs written in, for from_single_file."""
    with safe_open(str(checkpoint), framework="pt") as handle:
        embedded = json.loads(handle.metadata()[CONFIGS_METADATA_KEY])
    shutil.copytree(config_folder(arch), folder)
    for name, config in embedded.items():
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / file).write_text(json.dumps(config), encoding="utf-8")
    return folder


def assert_same_weights(expected: DiffusionPipeline, actual: DiffusionPipeline) -> None:
    compared = 0
    for name in COMPONENTS:
        want = getattr(expected, name, None)
        if want is None:
            continue
        got = getattr(actual, name).state_dict()
        for key, tensor in want.state_dict().items():
            assert torch.allclose(got[key].float(), tensor.float(), rtol=0, atol=1e-6), (
                f"{name}.{key}"
            )
            compared += 1
    assert compared > 100


def patched_reference(model: Path, loras: list[tuple[Path, float]], arch: Arch) -> LoadedModel:
    reference = load(model)
    report = NetworkPatcher(reference.pipe, arch).apply(
        [(load_network(path), weight) for path, weight in loras]
    )
    assert all(r.applied and not r.warnings for r in report.networks)
    return reference


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SDXL], ids=lambda a: a.value)
def test_merged_single_file_loads_in_diffusers_with_patched_weights(
    tiny_checkpoint_factory, tmp_path: Path, arch: Arch
) -> None:
    model = tiny_checkpoint_factory(arch)
    base = load(model)
    loras = [
        (write_kohya_lora(base.pipe, arch, tmp_path / "a.safetensors", seed=1), 0.7),
        (write_kohya_lora(base.pipe, arch, tmp_path / "b.safetensors", seed=2, every=3), -0.4),
    ]
    out = tmp_path / "out" / "merged.safetensors"

    result = merge_checkpoint(model, loras, out)

    assert result.out == out and [lora.weight for lora in result.loras] == [0.7, -0.4]
    assert all(lora.report.matched and not lora.report.warnings for lora in result.loras)
    reference = patched_reference(model, loras, arch)
    pipeline_class = StableDiffusionXLPipeline if arch is Arch.SDXL else StableDiffusionPipeline
    extra = {} if arch is Arch.SDXL else {"safety_checker": None, "feature_extractor": None}
    merged = pipeline_class.from_single_file(
        str(out),
        config=str(diffusers_config_folder(out, arch, tmp_path / "config")),
        local_files_only=True,
        **extra,
    )
    assert_same_weights(reference.pipe, merged)
    # and not equal to the unpatched model: the LoRAs did change it
    assert not torch.equal(merged.unet.conv_in.weight, load(model).pipe.unet.conv_in.weight), (
        "merge changed nothing"
    )

    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        with safe_open(str(model), framework="pt") as source:
            assert set(handle.keys()) == set(source.keys())
            assert metadata[CONFIGS_METADATA_KEY] == source.metadata()[CONFIGS_METADATA_KEY]
    assert (
        metadata["modelspec.merged_from"] == f"{model.name}, a.safetensors:0.7, b.safetensors:-0.4"
    )
    recipe = json.loads(metadata[MERGE_METADATA_KEY])
    assert [(entry["file"], entry["weight"]) for entry in recipe["loras"]] == [
        ("a.safetensors", 0.7),
        ("b.safetensors", -0.4),
    ]


def test_merge_cli_keeps_source_tensors_it_does_not_convert(
    tiny_checkpoint_factory, tmp_path: Path, capfd
) -> None:
    """Through `app.py merge`, from a source carrying a tensor no conversion produces (like SD2's
    24th text layer or an EMA copy): it is written back unchanged."""
    source = tiny_checkpoint_factory(Arch.SD1)
    model = tmp_path / "with-extra.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    kept = torch.arange(6, dtype=torch.float16)
    save_file({**tensors, "model_ema.decay": kept}, str(model), metadata=metadata)
    lora = write_kohya_lora(load(source).pipe, Arch.SD1, tmp_path / "style.safetensors", seed=3)
    out = tmp_path / "merged.safetensors"

    done = run_app(
        capfd, "merge", "--model", str(model), "--lora", f"{lora}:0.5", "--out", str(out)
    )

    assert done.returncode == 0, done.stderr
    assert "loading" in done.stderr and "applying" in done.stderr and "saving" in done.stderr
    assert "style ×0.5:" in done.stdout and "modules matched" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == str(out)
    with safe_open(str(out), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("model_ema.decay"), kept)
    assert_same_weights(patched_reference(source, [(lora, 0.5)], Arch.SD1).pipe, load(out).pipe)


def test_merge_of_a_diffusers_folder_writes_a_diffusers_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-sd1"
    build_pipeline(ModelSpec(Arch.SD1)).save_pretrained(str(folder))
    base = load(folder)
    lora = write_kohya_lora(base.pipe, Arch.SD1, tmp_path / "style.safetensors", seed=4)
    out = tmp_path / "merged"

    result = merge_checkpoint(folder, [(lora, 0.8)], out)

    assert (out / "model_index.json").is_file() and result.layout.value == "diffusers"
    merged = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert_same_weights(patched_reference(folder, [(lora, 0.8)], Arch.SD1).pipe, merged)


def test_merge_refuses_to_overwrite_its_input(tiny_checkpoint_factory, tmp_path: Path) -> None:
    model = tiny_checkpoint_factory(Arch.SD1)
    lora = write_kohya_lora(load(model).pipe, Arch.SD1, tmp_path / "style.safetensors", seed=6)
    before = model.stat().st_mtime_ns
    alias = tmp_path / "alias.safetensors"
    alias.symlink_to(model)
    for out in (model, alias):
        with pytest.raises(MergeError, match="must not be the input"):
            merge_checkpoint(model, [(lora, 1.0)], out)
    assert model.stat().st_mtime_ns == before


def test_merge_refuses_a_lora_of_another_base(tiny_checkpoint_factory, tmp_path: Path) -> None:
    sdxl = load(tiny_checkpoint_factory(Arch.SDXL))
    lora = write_kohya_lora(sdxl.pipe, Arch.SDXL, tmp_path / "xl-style.safetensors", seed=5)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MergeError, match=r"is SD1, but xl-style is for SDXL"):
        merge_checkpoint(tiny_checkpoint_factory(Arch.SD1), [(lora, 1.0)], out)
    assert not out.exists()


# -- inspect-lora ---------------------------------------------------------------------------------

_TAGS = {"set_a": {"fox": 10, "red": 4, "forest": 2}, "set_b": {"fox": 3, "snow": 5}}


@pytest.fixture(scope="module")
def lycoris_lora(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A LyCORIS (algo lora, rank 4, alpha 2) file for the tiny SD1 model, with kohya metadata."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        # LyCORIS' "full" preset crashes on SD UNets: a preset of our own, linear and conv layers.
        preset = register_preset(
            monkeypatch,
            "webui-inspect",
            unet_target_module=["Transformer2DModel", "ResnetBlock2D"],
            unet_target_name=["conv_in", "conv_out"],
            text_encoder_target_name=[],
        )
        path = tmp_path_factory.mktemp("lycoris") / "lyco-fox.safetensors"
        metadata = {
            "ss_output_name": "lyco-fox",
            "ss_base_model_version": "sd_v1",
            "ss_network_module": "lycoris.kohya",
            "ss_network_dim": "4",
            "ss_network_alpha": "2",
            "ss_num_epochs": "7",
            "ss_tag_frequency": json.dumps(_TAGS),
        }
        write_lycoris(
            build_pipeline(ModelSpec(Arch.SD1)),
            path,
            preset=preset,
            algo="lora",
            alpha=2,
            std=None,
            metadata=metadata,
            conv_dim=4,
            conv_alpha=2,
        )
        yield path


def test_inspect_lora_reports_a_lycoris_file(
    lycoris_lora: Path, tiny_checkpoint_factory, tmp_path: Path, capfd
) -> None:
    model = tiny_checkpoint_factory(Arch.SD1)
    prefixes = file_prefixes(lycoris_lora)
    text_run = run_app(capfd, "inspect-lora", str(lycoris_lora))
    json_run = run_app(capfd, "inspect-lora", str(lycoris_lora), "--model", str(model), "--json")

    assert text_run.returncode == 0, text_run.stderr
    text = text_run.stdout
    modules = len(prefixes)
    te = sum(p.startswith("lora_te_") for p in prefixes)
    assert "variant:     lora\n" in text
    assert f"rank:        4 ×{modules}\n" in text
    assert f"alpha:       2 ×{modules}\n" in text
    assert "base:        SD1 (ss_base_model_version='sd_v1')" in text
    assert f"modules:     {modules} (te {te}, unet {modules - te})" in text
    assert "top tags:     fox (13), snow (5), red (4), forest (2)" in text
    assert "output name:  lyco-fox" in text and "epochs:       7" in text
    assert "AutoV2 " in text and "AutoV3 " in text

    assert json_run.returncode == 0, json_run.stderr
    report = json.loads(json_run.stdout)
    assert report["variants"] == ["lora"]
    assert report["ranks"] == [{"value": 4.0, "count": modules}]
    assert report["alphas"] == [{"value": 2.0, "count": modules}]
    assert report["base"] == "SD1"
    assert report["metadata"]["network_module"] == "lycoris.kohya"
    assert report["metadata"]["top_tags"][0] == ["fox", 13]
    assert report["unsupported"] == []
    check = report["model_check"]
    assert check["base_fits"] is True
    assert (check["matched"], check["unmatched"], check["shape_mismatch"]) == (modules, 0, 0)
    assert check["model_arch"] == "SD1"


def test_inspection_text_reports_the_fit_on_a_model(
    lycoris_lora: Path, tiny_checkpoint_factory
) -> None:
    network = load_network(lycoris_lora)
    sdxl = load(tiny_checkpoint_factory(Arch.SDXL))
    report = NetworkPatcher(sdxl.pipe, Arch.SDXL).apply([(network, 0.0)])
    text = format_text(
        inspect_network(network, model_check(report.networks[0], "tiny-sdxl", Arch.SDXL))
    )
    assert "on model tiny-sdxl (SDXL):" in text
    assert "base fits:      no: made for SD1" in text
    assert "warning: lyco-fox: made for SD1" in text


def test_bad_inputs_get_one_line_errors(tiny_checkpoint_factory, tmp_path: Path, capfd) -> None:
    model = tiny_checkpoint_factory(Arch.SD1)
    not_lora = tmp_path / "embedding.safetensors"
    save_file({"emb_params": torch.zeros(2, 8)}, str(not_lora))

    runs = [run_app(capfd, "inspect-lora", str(path)) for path in (not_lora, model)]

    expected = [
        ("embedding.safetensors", "not a LoRA"),
        (model.name, "checkpoint, not a LoRA"),
    ]
    for done, (name, words) in zip(runs, expected, strict=True):
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2, done.stderr
        assert len(errors) == 1 and name in errors[0] and words in errors[0], done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout == ""
