"""A1111 emphasis on FLUX.1, as Forge's T5 engine reads it: each fragment tokenized alone by T5,
its tokens carrying its weight, the T5 hidden states scaled per token with the mean restored;
CLIP-L (pooled only) gets the text without syntax; BREAK starts another 512-token T5 sequence.
References: token ids read from the T5 vocabulary by hand, the tiny T5 encoder's own output,
and diffusers' `FluxPipeline.encode_prompt` (plain prompts must give exactly its embeddings).
The counter counts T5 tokens out of 512 on FLUX.1, and the prompt box's info follows the family."""

from __future__ import annotations

import pytest
import torch
from engine_settings import cpu_settings
from flux_models import write_flux_models

from webui.arch import Arch, FluxVariant, Prediction
from webui.engine.checkpoints import ModelKind
from webui.engine.flux_encoding import encode_flux_prompts, t5_sequences
from webui.engine.generate import DEMO_MODEL_NAME, Engine
from webui.engine.generation_controls import controls_for
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.engine.token_count import count_t5_tokens
from webui.ui.family_controls import family_updates
from webui.ui.txt2img import token_counter_html

WEIGHTED = "a (red:1.5) cat"


@pytest.fixture(scope="module")
def pipe():
    pipe = build_pipeline(
        ModelSpec(Arch.FLUX1, variant=FluxVariant.SCHNELL), seed=3, with_vae=False
    )
    pipe.text_encoder.eval()  # built in training mode: T5's dropout would make every call differ
    pipe.text_encoder_2.eval()
    return pipe


def _diffusers(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=texts, prompt_2=None, device="cpu", max_sequence_length=512
        )
    return embeds, pooled


def test_t5_tokens_and_weights_follow_forges_rule(pipe) -> None:
    """`a (red:1.5) cat`: the fragments "a ", "red", " cat" tokenized alone, then the end token
    (`</s>`, id 1); the ids are T5's vocabulary's, read by hand."""
    tokenizer = pipe.tokenizer_2
    (sequence,) = t5_sequences(tokenizer, WEIGHTED)
    assert tokenizer.convert_ids_to_tokens(list(sequence.token_ids)) == [
        *("▁", "a", "▁red", "▁cat", "</s>")
    ]
    assert sequence.token_ids == (3, 9, 1131, 1712, 1)
    assert sequence.weights == (1.0, 1.0, 1.5, 1.0, 1.0)
    # nesting multiplies (1.1 * 1.1), square brackets divide; an escaped bracket is text
    (nested,) = t5_sequences(tokenizer, "((red)) [cat] \\(dog\\)")
    assert tokenizer.convert_ids_to_tokens(list(nested.token_ids)) == [
        *("▁red", "▁cat", "▁(", "dog", ")", "</s>")  # the lone space between gives no token
    ]
    assert nested.weights == pytest.approx((1.21, 1 / 1.1, 1.0, 1.0, 1.0, 1.0))
    (escaped,) = t5_sequences(tokenizer, "a \\(red\\) cat")
    assert escaped.token_ids == tuple(tokenizer("a (red) cat").input_ids)
    assert set(escaped.weights) == {1.0}
    # BREAK ends a sequence (Forge's `next_chunk`); nothing after the last BREAK adds none
    assert [s.token_ids for s in t5_sequences(tokenizer, "a BREAK b")] == [(3, 9, 1), (3, 115, 1)]
    assert [s.token_ids for s in t5_sequences(tokenizer, "a BREAK")] == [(3, 9, 1)]


def test_weighted_t5_states_are_the_plain_states_scaled_with_the_mean_restored(pipe) -> None:
    """By hand from T5's own output on the same ids: z * w, times mean(z) / mean(z * w)."""
    ids = torch.tensor([[3, 9, 1131, 1712, 1] + [0] * 507])  # pad id 0 up to 512
    weights = torch.ones(512, dtype=torch.float64)
    weights[2] = 1.5
    with torch.no_grad():
        plain = pipe.text_encoder_2(ids)[0][0].double()
    scaled = plain * weights[:, None]
    expected = scaled * (plain.mean() / scaled.mean())
    got = encode_flux_prompts(pipe, [WEIGHTED]).embeds[0].double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the weight changed the conditioning


def test_clip_l_reads_the_text_without_syntax(pipe) -> None:
    """The pooled vector is CLIP-L's for the plain text before the first BREAK."""
    got = encode_flux_prompts(pipe, ["a (red:1.5) [\\(cat\\)] BREAK a dog"]).pooled
    _embeds, pooled = _diffusers(pipe, ["a red (cat)"])
    assert torch.equal(got, pooled)


@pytest.mark.parametrize(
    ("prompt", "as_diffusers_reads_it"),
    [
        ("a red fox", "a red fox"),
        ("x " * 600, "x " * 600),  # cut at 511 tokens + the end token, as the tokenizer cuts
        ("", ""),
        ("a \\(red\\) fox", "a (red) fox"),  # an escaped bracket stays a literal one
    ],
)
def test_a_prompt_without_emphasis_gives_exactly_diffusers_embeddings(
    pipe, prompt: str, as_diffusers_reads_it: str
) -> None:
    got = encode_flux_prompts(pipe, [prompt] * 2)
    embeds, pooled = _diffusers(pipe, [as_diffusers_reads_it] * 2)
    assert torch.equal(got.embeds, embeds)
    assert torch.equal(got.pooled, pooled)


def test_break_starts_another_512_token_sequence(pipe) -> None:
    got = encode_flux_prompts(pipe, ["a cat BREAK a dog"]).embeds
    assert got.shape[1] == 1024
    assert torch.equal(got[:, :512], _diffusers(pipe, ["a cat"])[0])
    assert torch.equal(got[:, 512:], _diffusers(pipe, ["a dog"])[0])


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("", "1/512"),  # the end token alone
        ("a (red:1.5) cat <lora:x:1>", "5/512"),  # ▁ a ▁red ▁cat </s>
        ("a BREAK b", "515/1024"),  # the first sequence reads all its 512, then ▁ b </s>
        ("cat " * 600, "601/512"),  # past 512: the rest is cut
    ],
)
def test_t5_count(pipe, text: str, shown: str) -> None:
    count = count_t5_tokens(pipe.tokenizer_2, text)
    assert count.format() == shown
    assert ("lw-tokens-chunked" in token_counter_html(count)) is (count.limit > 512)


def test_engine_counts_t5_tokens_on_flux_and_clip_chunks_on_sd(tmp_path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    engine = Engine(cpu_settings(models, tmp_path / "loras", tmp_path, save_outputs=False))
    names = write_flux_models(models)
    engine.load(names[FluxVariant.SCHNELL])
    assert engine.count_tokens("a (red:1.5) cat").format() == "5/512"
    engine.load(DEMO_MODEL_NAME)  # SD: A1111's CLIP count, as before
    assert engine.count_tokens("a (red:1.5) cat").format() == "3/75"
    assert engine.count_tokens("word " * 80).format() == "80/150"


@pytest.mark.parametrize(
    ("kind", "says", "never"),
    [
        (ModelKind(Arch.SD1, Prediction.EPSILON), "BREAK starts a new 75-token chunk", "T5"),
        (
            ModelKind(Arch.FLUX1, None, variant=FluxVariant.DEV),
            "T5 reads 512 tokens, BREAK starts another 512",
            "75",
        ),
    ],
)
def test_the_prompt_info_follows_the_family(kind: ModelKind, says: str, never: str) -> None:
    prompt = family_updates(controls_for(kind), None)[-2]  # the prompt box, before the State
    assert says in prompt["info"] and "(word:1.2) emphasis" in prompt["info"]
    assert never not in prompt["info"]
