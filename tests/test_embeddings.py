"""Textual-inversion embeddings, A1111's way: the name's tokens are replaced by the embedding's
vectors in the text encoder's input embeddings. References are built independently: the
encoder's vocabulary is extended by the embedding's rows (a copy of the encoder) and fed hand-
built token ids; the SDXL pooled vector is projected by hand at the end token."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from engine_settings import cpu_settings
from lora_files import write_kohya_lora
from safetensors.torch import load_file, save_file
from torch import nn

from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest
from webui.engine.infotext import parse_infotext
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.engine.prompt_encoding import (
    PLACEHOLDER_TOKEN,
    EmbeddingFix,
    PromptEmbedding,
    chunk_prompt,
    encode_for_pipeline,
)
from webui.networks.library.embedding_library import (
    EmbeddingLibrary,
    list_embeddings,
    read_bundled_embeddings,
    read_embedding_file,
)

NAME = "inkstyle"
PREFIX, SUFFIX = "a photo of", "in a forest"
PROMPT = f"{PREFIX} {NAME} {SUFFIX}"


@pytest.fixture(scope="module")
def sd1():
    return build_pipeline(ModelSpec(Arch.SD1))


@pytest.fixture(scope="module")
def sdxl():
    return build_pipeline(ModelSpec(Arch.SDXL))


def vectors(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn((count, width), generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(path: Path, vecs: torch.Tensor) -> None:
    """The file A1111's `Embedding.save` writes."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vecs},
        "name": path.stem,
        "step": 1500,
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "model",
    }
    torch.save(data, path)


def words(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def reference_output(encoder: nn.Module, tokenizer, vecs: torch.Tensor, pad: int):
    """The encoder run on [BOS, prefix, NEW ROWS, suffix, EOS, pad...], the new rows appended
    to a copy of its vocabulary: the math A1111's replacement must equal."""
    encoder = copy.deepcopy(encoder)
    table = encoder.get_input_embeddings()
    first_new = table.weight.shape[0]
    encoder.set_input_embeddings(nn.Embedding.from_pretrained(torch.cat([table.weight, vecs])))
    new_ids = list(range(first_new, first_new + vecs.shape[0]))
    ids = [tokenizer.bos_token_id, *words(tokenizer, PREFIX), *new_ids, *words(tokenizer, SUFFIX)]
    ids.append(tokenizer.eos_token_id)
    eos_index = len(ids) - 1
    ids += [pad] * (77 - len(ids))
    with torch.no_grad():
        return encoder(torch.tensor([ids]), output_hidden_states=True), eos_index


def sd1_embeds(pipe, prompt: str, embeddings=(), negative: str = "") -> torch.Tensor:
    return encode_for_pipeline(pipe, Arch.SD1, [prompt], [negative], 1, embeddings=embeddings)[
        "prompt_embeds"
    ]


@pytest.mark.parametrize("file_format", ["a1111_pt", "emb_params_safetensors"])
def test_sd1_embedding_replaces_the_names_input_embeddings(sd1, tmp_path, file_format) -> None:
    vecs = vectors(3, sd1.text_encoder.config.hidden_size, seed=1)
    if file_format == "a1111_pt":
        path = tmp_path / f"{NAME}.pt"
        write_a1111_pt(path, vecs)
    else:
        path = tmp_path / f"{NAME}.safetensors"
        save_file({"emb_params": vecs}, str(path))
    embedding = read_embedding_file(path)
    assert embedding.name == NAME and embedding.vector_count == 3

    ours = sd1_embeds(sd1, PROMPT, [embedding])
    reference, _ = reference_output(
        sd1.text_encoder, sd1.tokenizer, vecs, sd1.tokenizer.eos_token_id
    )
    torch.testing.assert_close(ours, reference.last_hidden_state, rtol=0, atol=1e-6)
    # the name's own tokens would give something else
    assert not torch.allclose(ours, sd1_embeds(sd1, PROMPT), atol=1e-3)


def test_sdxl_embedding_feeds_clip_l_and_clip_g_to_their_encoders(sdxl, tmp_path) -> None:
    clip_l = vectors(2, sdxl.text_encoder.config.hidden_size, seed=2)
    clip_g = vectors(2, sdxl.text_encoder_2.config.hidden_size, seed=3)
    path = tmp_path / f"{NAME}.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(path))
    embedding = read_embedding_file(path)
    assert embedding.encoders == ("clip_l", "clip_g")

    args = encode_for_pipeline(sdxl, Arch.SDXL, [PROMPT], ["blurry"], 1, embeddings=[embedding])
    first, _ = reference_output(
        sdxl.text_encoder, sdxl.tokenizer, clip_l, sdxl.tokenizer.pad_token_id
    )
    second, eos = reference_output(
        sdxl.text_encoder_2, sdxl.tokenizer_2, clip_g, sdxl.tokenizer_2.pad_token_id
    )
    # A1111's SDXL conditioning: both penultimate hidden states, side by side
    expected = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    torch.testing.assert_close(args["prompt_embeds"], expected, rtol=0, atol=1e-6)
    # pooled: the final hidden state at the end token, projected (by hand, see TRAPS.md)
    with torch.no_grad():
        pooled = sdxl.text_encoder_2.text_projection(second.last_hidden_state[0, eos])
    torch.testing.assert_close(args["pooled_prompt_embeds"][0], pooled, rtol=0, atol=1e-6)


def test_embedding_bundled_in_a_lora(sd1, tmp_path) -> None:
    vecs = vectors(2, sd1.text_encoder.config.hidden_size, seed=4)
    lora = tmp_path / "styled.safetensors"
    write_kohya_lora(lora, Arch.SD1)
    tensors = load_file(str(lora))
    tensors[f"bundle_emb.{NAME}.string_to_param.*"] = vecs
    save_file(tensors, str(lora))

    bundled, problems = read_bundled_embeddings(lora, "styled")
    assert problems == [] and [e.name for e in bundled] == [NAME]
    assert bundled[0].short_hash == "styled"  # A1111 writes the LoRA's name as its hash

    ours = sd1_embeds(sd1, PROMPT, bundled)
    reference, _ = reference_output(
        sd1.text_encoder, sd1.tokenizer, vecs, sd1.tokenizer.eos_token_id
    )
    torch.testing.assert_close(ours, reference.last_hidden_state, rtol=0, atol=1e-6)


def test_prompt_without_the_name_is_bit_identical(sd1, sdxl, tmp_path) -> None:
    sd1_emb = PromptEmbedding(NAME, vectors(2, 32, 5))
    path = tmp_path / f"{NAME}.safetensors"
    save_file({"clip_l": vectors(2, 32, 6), "clip_g": vectors(2, 64, 7)}, str(path))
    xl_emb = read_embedding_file(path)
    prompt = "a (photo:1.2) of a cat, " * 10  # two chunks, emphasis

    class Held:
        name, vectors = NAME, (sd1_emb.vectors,)

    assert torch.equal(sd1_embeds(sd1, prompt, [Held()]), sd1_embeds(sd1, prompt))
    with_emb = encode_for_pipeline(sdxl, Arch.SDXL, [prompt], ["x"], 1, embeddings=[xl_emb])
    without = encode_for_pipeline(sdxl, Arch.SDXL, [prompt], ["x"], 1)
    for key, value in without.items():
        assert torch.equal(with_emb[key], value), key


def test_chunking_places_vectors_as_a1111(sd1) -> None:
    tokenizer = sd1.tokenizer
    embedding = PromptEmbedding(NAME, torch.zeros(5, 32))
    # 72 single-token words, then the 5-vector embedding: it does not fit (72 + 5 > 75)
    text = "cat " * 72 + f"({NAME}:1.5)"
    first, second = chunk_prompt(tokenizer, text, embeddings=[embedding])
    assert first.fixes == () and first.token_ids[73:] == (tokenizer.eos_token_id,) * 4
    assert second.fixes == (EmbeddingFix(1, NAME),)
    assert second.token_ids[1:6] == (PLACEHOLDER_TOKEN,) * 5
    assert second.token_ids[6] == tokenizer.eos_token_id
    assert second.multipliers[1:6] == (1.5,) * 5 and second.multipliers[6] == 1.0
    # the longest name wins where two match
    longer = PromptEmbedding(NAME + "cat", torch.zeros(1, 32))
    [chunk] = chunk_prompt(tokenizer, f"{NAME}cat", embeddings=[embedding, longer])
    assert chunk.fixes == (EmbeddingFix(1, NAME + "cat"),)


def test_library_lists_checks_and_reports_bad_files(tmp_path) -> None:
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    write_a1111_pt(folder / "sub" / "good.pt", vectors(4, 32, 8))
    save_file(
        {"clip_l": vectors(1, 32, 9), "clip_g": vectors(1, 64, 9)}, str(folder / "xl.safetensors")
    )
    save_file({"a": vectors(1, 32, 1), "b": vectors(1, 32, 1)}, str(folder / "two.safetensors"))
    (folder / "broken.pt").write_bytes(b"not a pickle")
    (folder / "empty.pt").write_bytes(b"")  # skipped, as A1111 does

    infos = {info.name: info for info in list_embeddings(folder)}
    assert set(infos) == {"good", "xl", "two", "broken"}
    assert (infos["good"].vector_count, infos["good"].widths) == (4, (32,))
    assert infos["xl"].encoders == ("clip_l", "clip_g") and infos["xl"].widths == (32, 64)
    assert "one tensor" in (infos["two"].error or "")
    assert infos["broken"].error

    usable, warnings = EmbeddingLibrary(folder).active([32], [])
    assert [e.name for e in usable] == ["good"]  # the SDXL one does not fit an SD1 model
    assert any("two.safetensors" in w for w in warnings)
    assert any("broken.pt" in w for w in warnings)


class Payload:
    """Any class: weights-only loading must refuse it."""


def test_pickles_load_only_weights(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "x": Payload()}, path)
    [info] = list_embeddings(tmp_path)
    assert "weights_only" in (info.error or "")


def test_generation_uses_folder_and_bundled_embeddings_and_writes_ti_hashes(
    tmp_path, tiny_checkpoint_factory
) -> None:
    checkpoint = tiny_checkpoint_factory(Arch.SD1)
    models, loras, embeddings = tmp_path / "models", tmp_path / "loras", tmp_path / "emb"
    for folder in (models, loras, embeddings):
        folder.mkdir()
    shutil.copy(checkpoint, models / checkpoint.name)
    write_a1111_pt(embeddings / "bad,name.pt", vectors(2, 32, 10))
    lora = loras / "styled.safetensors"
    write_kohya_lora(lora, Arch.SD1)
    tensors = load_file(str(lora))
    tensors["bundle_emb.inkstyle.clip_l"] = vectors(1, 32, 11)
    save_file(tensors, str(lora))
    engine = Engine(cpu_settings(models, loras, tmp_path, embeddings_dir=embeddings))
    engine.load(checkpoint.stem)

    def render(prompt: str):
        request = GenerationRequest(prompt=prompt, width=64, height=64, steps=1)
        result = engine.generate(request)
        return parse_infotext(result.images[0].infotext.format()).params

    file_hash = hashlib.sha256((embeddings / "bad,name.pt").read_bytes()).hexdigest()[:12]
    params = render("a cat, bad,name, inkstyle <lora:styled:0.5>")
    assert params["TI hashes"] == f"badname: {file_hash}, inkstyle: styled"
    # without the LoRA's tag its bundled embedding is not available
    params = render("a cat, bad,name, inkstyle")
    assert params["TI hashes"] == f"badname: {file_hash}"
    assert "TI hashes" not in render("a cat")
