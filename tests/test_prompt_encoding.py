"""A1111 prompt semantics: emphasis parsing (pure), chunking, "Original" emphasis, long prompts,
BREAK, CFG chunk equalisation, clip skip, and SDXL against diffusers' own encoder."""

from __future__ import annotations

import pytest
import torch

from webui.arch import UNET_ARCHES, Arch
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.engine.prompt_encoding import (
    BREAK,
    CHUNK_POSITIONS,
    chunk_prompt,
    encode_for_pipeline,
    encode_prompt_pair,
    encode_prompts,
    encode_sdxl_prompts,
    final_layer_norm,
    parse_attention,
)

R = 1.1  # round brackets
S = 1 / 1.1  # square brackets

# (prompt, fragments with hand-computed weights)
ATTENTION_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("", [("", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("((word))", [("word", R * R)]),
    ("(((word)))", [("word", R * R * R)]),
    ("[word]", [("word", S)]),
    ("[[word]]", [("word", S * S)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word:0.5) x", [("word", 0.5), (" x", 1.0)]),
    ("(word:-1)", [("word", -1.0)]),
    ("((word:1.3))", [("word", 1.3 * R)]),
    ("[(word:2)]", [("word", 2 * S)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.3 * R * R),
            (" ", R),
            ("on", 1.0),
            (" a ", R),
            ("hill", 0.5 * R),
            (", sun, ", R),
            ("sky", R * R * R * R),  # the first "(" is never closed
            (".", R),
        ],
    ),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    # escapes: literal brackets and backslash; a lone backslash disappears
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"a \[b\) c", [("a [b) c", 1.0)]),
    (r"back\\slash", [("back\\slash", 1.0)]),
    (r"a \q", [("a q", 1.0)]),
    # unbalanced: unclosed openers run to the end, unmatched closers are text
    ("(unbalanced", [("unbalanced", R)]),
    ("a [b", [("a ", 1.0), ("b", S)]),
    ("((a) b", [("a", R * R), (" b", R)]),
    ("a ) b ]", [("a ) b ]", 1.0)]),
    ("a :1.5) b", [("a :1.5) b", 1.0)]),
    ("x: y", [("x: y", 1.0)]),
    # a weight closes the innermost round bracket, whatever square bracket is open inside it
    ("(a [b:1.5) c", [("a ", 1.5), ("b", 1.5 * S), (" c", S)]),
    # malformed weight: text, and the bracket closes as a plain `)`
    ("(a:1.2.3)", [("a:1.2.3", R)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a, BREAK, b", [("a,", 1.0), BREAK, (", b", 1.0)]),
    ("BREAK a", [("", 1.0), BREAK, ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), BREAK, ("", 1.0)]),
    ("aBREAK BREAKb", [("aBREAK BREAKb", 1.0)]),
    ("(a BREAK b)", [("a", R), BREAK, ("b", R)]),
    ("(a) BREAK (b)", [("a", R), ("", 1.0), BREAK, ("", 1.0), ("b", R)]),
]


@pytest.mark.parametrize(("prompt", "expected"), ATTENTION_CASES)
def test_parse_attention(prompt: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_attention(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([w for _, w in expected])


# -- chunking (tokenizer only) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pipes() -> dict[Arch, object]:
    """Tiny pipelines whose final LayerNorms have a trained-looking bias: at initialisation
    they centre every row, and "Original" emphasis divides by that (near-zero) mean."""
    built = {arch: build_pipeline(ModelSpec(arch)) for arch in UNET_ARCHES}
    generator = torch.Generator().manual_seed(0)
    for pipe in built.values():
        for encoder in filter(None, [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]):
            bias = final_layer_norm(encoder).bias
            with torch.no_grad():
                bias.copy_(0.3 + 0.1 * torch.randn(bias.shape, generator=generator))
    return built


def _prompt_tokens(chunk_ids: tuple[int, ...], eos: int) -> list[int]:
    """The prompt tokens of a chunk: between BOS and the first EOS."""
    return list(chunk_ids[1 : chunk_ids.index(eos)])


def test_chunks_are_77_tokens_and_never_truncate(pipes) -> None:
    tokenizer = pipes[Arch.SD1].tokenizer
    cat, eos = tokenizer.convert_tokens_to_ids("cat</w>"), tokenizer.eos_token_id
    for words, chunks in [(1, 1), (75, 1), (76, 2), (150, 2), (151, 3), (200, 3)]:
        result = chunk_prompt(tokenizer, "cat " * words)
        assert len(result) == chunks
        assert all(len(c.token_ids) == len(c.multipliers) == CHUNK_POSITIONS for c in result)
        assert sum(len(_prompt_tokens(c.token_ids, eos)) for c in result) == words
        assert all(c.token_ids[0] == tokenizer.bos_token_id for c in result)
        assert set(_prompt_tokens(result[-1].token_ids, eos)) == {cat}


def test_comma_within_20_tokens_moves_the_words_after_it(pipes) -> None:
    tokenizer = pipes[Arch.SD1].tokenizer
    cat, dog = (tokenizer.convert_tokens_to_ids(t) for t in ("cat</w>", "dog</w>"))
    comma, eos = tokenizer.convert_tokens_to_ids(",</w>"), tokenizer.eos_token_id
    first, second = chunk_prompt(tokenizer, "cat " * 70 + ", " + "dog " * 10)
    assert _prompt_tokens(first.token_ids, eos) == [cat] * 70 + [comma]
    assert _prompt_tokens(second.token_ids, eos) == [dog] * 10
    # a comma further back than 20 tokens: the chunk is simply cut at 75
    first, second = chunk_prompt(tokenizer, "cat " * 40 + ", " + "dog " * 40)
    assert _prompt_tokens(first.token_ids, eos) == [cat] * 40 + [comma] + [dog] * 34
    assert _prompt_tokens(second.token_ids, eos) == [dog] * 6
    # with the rule off, the cut is at 75 whatever the commas
    first, _ = chunk_prompt(tokenizer, "cat " * 70 + ", " + "dog " * 10, comma_backtrack=0)
    assert len(_prompt_tokens(first.token_ids, eos)) == 75


def test_break_starts_a_new_chunk(pipes) -> None:
    tokenizer = pipes[Arch.SD1].tokenizer
    chunks = chunk_prompt(tokenizer, "a cat BREAK a dog")
    assert [c.token_ids for c in chunks] == [
        chunk_prompt(tokenizer, "a cat")[0].token_ids,
        chunk_prompt(tokenizer, "a dog")[0].token_ids,
    ]


def test_multipliers_follow_the_tokens(pipes) -> None:
    tokenizer = pipes[Arch.SD1].tokenizer
    (chunk,) = chunk_prompt(tokenizer, "a (cat:1.5) [on] grass")
    assert chunk.token_ids == chunk_prompt(tokenizer, "a cat on grass")[0].token_ids
    assert chunk.multipliers[:6] == pytest.approx([1.0, 1.0, 1.5, S, 1.0, 1.0])
    assert set(chunk.multipliers[6:]) == {1.0}


# -- SD1/SD2 encoding ---------------------------------------------------------------------------


@torch.no_grad()
def _reference_plain(tokenizer, text_encoder, prompts: list[str], clip_skip: int) -> torch.Tensor:
    """The encoding before emphasis existed: one padded, truncated 77-token sequence."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    output = text_encoder(ids, output_hidden_states=True)
    if clip_skip <= 1:
        return output.last_hidden_state
    return final_layer_norm(text_encoder)(output.hidden_states[-clip_skip])


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SD2])
def test_plain_short_prompts_encode_exactly_as_before(pipes, arch: Arch, clip_skip: int) -> None:
    pipe = pipes[arch]
    prompts = ["a photo of a cat, on grass", "", "cat " * 75]
    expected = _reference_plain(pipe.tokenizer, pipe.text_encoder, prompts, clip_skip)
    assert torch.equal(
        encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, clip_skip), expected
    )


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SD2])
def test_emphasis_scales_the_token_then_restores_the_mean(
    pipes, arch: Arch, clip_skip: int
) -> None:
    pipe = pipes[arch]
    z = _reference_plain(pipe.tokenizer, pipe.text_encoder, ["a cat"], clip_skip)[0]
    cat_row = 2  # BOS, "a", "cat"
    weighted = z.clone()
    weighted[cat_row] *= 1.5
    expected = weighted * (z.mean() / weighted.mean())

    ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a (cat:1.5)"], clip_skip)[0]
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ours, z)
    neutral = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a (cat:1)"], clip_skip)[0]
    assert torch.equal(neutral, z)


def test_long_prompt_has_three_chunks_and_keeps_its_end(pipes) -> None:
    pipe = pipes[Arch.SD1]
    cats = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["cat " * 200], 1)
    dog_last = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["cat " * 199 + "dog"], 1)
    assert cats.shape == (1, 3 * CHUNK_POSITIONS, 32)
    split = 2 * CHUNK_POSITIONS
    assert torch.equal(cats[:, :split], dog_last[:, :split])  # chunks are encoded separately
    assert not torch.allclose(cats[:, split:], dog_last[:, split:])


def test_break_chunks_are_encoded_separately(pipes) -> None:
    pipe = pipes[Arch.SD1]
    tok, te = pipe.tokenizer, pipe.text_encoder
    both = encode_prompts(tok, te, ["a cat BREAK a dog"], 1)
    assert both.shape[1] == 2 * CHUNK_POSITIONS
    assert torch.equal(both[:, :CHUNK_POSITIONS], encode_prompts(tok, te, ["a cat"], 1))
    assert torch.equal(both[:, CHUNK_POSITIONS:], encode_prompts(tok, te, ["a dog"], 1))


@pytest.mark.parametrize("long_side", ["prompt", "negative"])
def test_prompt_and_negative_get_the_same_chunk_count(pipes, long_side: str) -> None:
    pipe = pipes[Arch.SD1]
    tok, te = pipe.tokenizer, pipe.text_encoder
    long, short = "cat " * 200, "ugly"
    prompts, negatives = ([long], [short]) if long_side == "prompt" else ([short], [long])
    cond, uncond = encode_prompt_pair(tok, te, prompts * 2, negatives * 2, 1)
    assert cond.shape == uncond.shape == (2, 3 * CHUNK_POSITIONS, 32)
    padded = cond if long_side == "negative" else uncond
    assert torch.equal(padded[:, :CHUNK_POSITIONS], encode_prompts(tok, te, [short] * 2, 1))
    empty = encode_prompts(tok, te, [""], 1)
    assert torch.equal(padded[:, CHUNK_POSITIONS:], empty.repeat(2, 2, 1))


def test_shorter_prompts_in_a_batch_are_padded_with_empty_chunks(pipes) -> None:
    pipe = pipes[Arch.SD1]
    tok, te = pipe.tokenizer, pipe.text_encoder
    batch = encode_prompts(tok, te, ["cat " * 100, "a dog"], 1)
    assert batch.shape == (2, 2 * CHUNK_POSITIONS, 32)
    torch.testing.assert_close(batch[1:, CHUNK_POSITIONS:], encode_prompts(tok, te, [""], 1))


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SD2])
def test_clip_skip_2_differs_from_1(pipes, arch: Arch) -> None:
    pipe = pipes[arch]
    one = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a (cat) on grass"], 1)
    two = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a (cat) on grass"], 2)
    assert one.shape == two.shape
    assert not torch.allclose(one, two)


# -- SDXL ---------------------------------------------------------------------------------------


@torch.no_grad()
def _diffusers_sdxl(pipe, prompt: str, negative: str | None) -> dict[str, torch.Tensor]:
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt,
        device=torch.device("cpu"),
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=negative,
    )
    return {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative_embeds,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
    }


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize(
    ("negative", "diffusers_negative"),
    [("ugly, blurry", "ugly, blurry"), ("", None)],  # "" -> zeros, like diffusers' default
)
def test_sdxl_plain_prompts_match_diffusers(
    pipes, clip_skip: int, negative: str, diffusers_negative: str | None
) -> None:
    pipe = pipes[Arch.SDXL]
    prompt = "a photo of a cat, on grass"
    ours = encode_for_pipeline(pipe, Arch.SDXL, [prompt], [negative], clip_skip)
    expected = _diffusers_sdxl(pipe, prompt, diffusers_negative)
    assert ours.keys() == expected.keys()
    assert ours["prompt_embeds"].shape == (1, CHUNK_POSITIONS, 32 + 64)
    assert ours["pooled_prompt_embeds"].shape == (1, 32)
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0)
    if negative == "":
        assert not ours["negative_prompt_embeds"].any()


def test_sdxl_long_prompt_and_emphasis(pipes) -> None:
    pipe = pipes[Arch.SDXL]
    result = encode_for_pipeline(pipe, Arch.SDXL, ["cat " * 200] * 2, ["ugly"] * 2, 1)
    assert result["prompt_embeds"].shape == (2, 3 * CHUNK_POSITIONS, 96)
    assert result["negative_prompt_embeds"].shape == (2, 3 * CHUNK_POSITIONS, 96)
    assert result["pooled_prompt_embeds"].shape == (2, 32)

    plain = encode_sdxl_prompts(pipe, ["a cat"])
    weighted = encode_sdxl_prompts(pipe, ["a (cat:1.5)"])
    torch.testing.assert_close(weighted.pooled, plain.pooled)  # pooled is not emphasised
    for part in (slice(0, 32), slice(32, 96)):  # each encoder keeps its own mean
        z, ours = plain.embeds[0, :, part], weighted.embeds[0, :, part]
        scaled = z.clone()
        scaled[2] *= 1.5
        torch.testing.assert_close(ours, scaled * (z.mean() / scaled.mean()), atol=1e-6, rtol=1e-6)


def test_sdxl_clip_skip_only_with_the_clip_l_option(pipes) -> None:
    pipe = pipes[Arch.SDXL]
    base = encode_sdxl_prompts(pipe, ["a cat"], clip_skip=1)
    assert torch.equal(encode_sdxl_prompts(pipe, ["a cat"], clip_skip=3).embeds, base.embeds)
    skipped = encode_sdxl_prompts(pipe, ["a cat"], clip_skip=3, clip_l_skip=True)
    assert not torch.allclose(skipped.embeds[..., :32], base.embeds[..., :32])
    assert torch.equal(skipped.embeds[..., 32:], base.embeds[..., 32:])  # CLIP-G never skips
    assert torch.equal(skipped.pooled, base.pooled)


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SDXL])
def test_pipelines_accept_long_prompt_embeddings(pipes, arch: Arch) -> None:
    pipe = pipes[arch]
    arguments = encode_for_pipeline(pipe, arch, ["(cat:1.2) " * 100], ["ugly"], 2)
    latents = pipe(
        **arguments,
        num_inference_steps=1,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert torch.isfinite(latents).all()


def test_brackets_deeper_than_the_limit_are_text() -> None:
    """Past MAX_EMPHASIS_DEPTH open brackets of one kind, `(` is read as text (else every open
    bracket rescales everything after it: quadratic); the first 32 still multiply by 1.1."""
    from webui.engine.prompt_encoding import MAX_EMPHASIS_DEPTH, parse_attention

    extra = 3
    fragments = parse_attention("(" * (MAX_EMPHASIS_DEPTH + extra) + "cat")
    expected = 1.0
    for _ in range(MAX_EMPHASIS_DEPTH):
        expected *= 1.1
    assert fragments == [("(" * extra + "cat", expected)]
