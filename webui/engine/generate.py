"""GenerationRequest -> GenerationResult: the engine that holds one model and renders images.

Requests are serialized: one generation or model load runs at a time."""

from __future__ import annotations

import copy
import gc
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from webui.arch import Arch, Prediction
from webui.engine import hires as hires_upscale
from webui.engine.checkpoints import (
    CheckpointError,
    CheckpointFile,
    LoadedModel,
    ModelKind,
    checkpoint_from_path,
    find_checkpoints,
    load_checkpoint,
    place_pipeline,
)
from webui.engine.generation_controls import GenerationControls, controls_for
from webui.engine.hires import (
    SecondPassSchedule,
    get_upscaler,
    hires_fields,
    second_pass_schedule,
)
from webui.engine.image_grid import image_grid
from webui.engine.infotext import Infotext, model_schedule_fields, save_png
from webui.engine.live_preview import approximate
from webui.engine.lora_backends import LoraBackends, LoraRoute
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.engine.model_hash import HashCache
from webui.engine.network_set import ChosenNetwork, choose_networks
from webui.engine.prompt_encoding import embeddings_in_prompts, token_embedding
from webui.engine.recipes import recipe_for
from webui.engine.request import MAX_SEED as MAX_SEED
from webui.engine.request import GenerationRequest as GenerationRequest
from webui.engine.request import RequestError as RequestError
from webui.engine.token_count import TokenCount, count_for, count_tokens, reference_tokenizer
from webui.engine.trigger_words import TriggerWordSource, add_trigger_words, no_trigger_words
from webui.engine.variation_noise import variation_noise
from webui.networks.apply import Component, ModuleProgress
from webui.networks.library import Embedding, EmbeddingLibrary, NetworkCatalog
from webui.prompt import NetworkTag, ParsedPrompt, parse_prompt
from webui.settings import SAVED_OPTIONS, Settings, SettingsFile

log = logging.getLogger(__name__)

APP_VERSION = "lora-webui 0.1.0"
DEMO_MODEL_NAME = "demo-tiny-sd1 (random weights)"
OUTPUTS_SUBFOLDER = "txt2img-images"  # A1111's folder for txt2img outputs
GRIDS_SUBFOLDER = "txt2img-grids"  # and for the grids of batches
_NUMBERED = re.compile(r"^(\d+)-")


class NoModelError(RuntimeError):
    """Generation was asked for before any model was loaded."""


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: Infotext
    path: Path | None = None


@dataclass(frozen=True)
class GenerationResult:
    images: list[GeneratedImage]
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    lora_routes: tuple[LoraRoute, ...] = ()  # which backend took each LoRA, and why


class Stage(StrEnum):
    """What a running job is doing."""

    LORAS = "loras"  # writing LoRA weights: steps count modules
    DENOISE = "denoise"  # denoising: steps count sampler steps over the whole request
    EXTRACT = "extract"  # the Tools tab's LoRA extraction: steps count modules factorized
    BAKE = "bake"  # baking LoRAs into a checkpoint: steps count load, apply, save


@dataclass(frozen=True)
class Progress:
    """Where the running job is: `step` of `total` in its current stage."""

    step: int
    total: int
    image_index: int = 0  # first image of the batch being denoised
    stage: Stage = Stage.DENOISE
    preview: Image.Image | None = None  # the first image's live preview, every N steps
    what: str = ""  # a tool's current item or phase ("loading tiny.safetensors", a module)

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    @property
    def unit(self) -> str:
        return _UNITS[self.stage]

    @property
    def description(self) -> str:
        """One line for a progress bar."""
        if self.stage is Stage.LORAS:
            return f"Applying LoRAs: {self.step}/{self.total} modules"
        if self.stage is Stage.DENOISE:
            return f"Step {self.step}/{self.total}"
        return self.what or f"{self.stage.value.capitalize()}: {self.step}/{self.total}"


_UNITS = {
    Stage.LORAS: "modules",
    Stage.DENOISE: "steps",
    Stage.EXTRACT: "modules",
    Stage.BAKE: "stages",
}


ProgressCallback = Callable[[Progress], None]


def _module_progress(on_progress: ProgressCallback | None) -> ModuleProgress | None:
    """The patcher's (modules done, total) as `Stage.LORAS` progress, once per percent."""
    if on_progress is None:
        return None
    reported = -1

    def report(done: int, total: int) -> None:
        nonlocal reported
        percent = done * 100 // total
        if percent != reported:
            reported = percent
            on_progress(Progress(done, total, stage=Stage.LORAS))

    return report


@dataclass(frozen=True)
class RoutedNetwork(ChosenNetwork):
    """A chosen network with the backend that took it."""

    route: LoraRoute | None = None


def _first_set(value: int | None, default: int) -> int:
    return default if value is None else value


@dataclass(frozen=True)
class _Span:
    """One pass's place in the request's progress: `steps` steps after `offset` of `total`."""

    offset: int
    steps: int
    total: int


@dataclass(frozen=True)
class _SecondPass:
    """The hires pass of a request: its pipeline, schedule, prompts, and the networks to apply
    for it (None: the first pass's stay)."""

    pipe: Any
    schedule: SecondPassSchedule
    prompt: ParsedPrompt
    negative: ParsedPrompt | None
    networks: tuple[NetworkTag, ...] | None
    settings: GenerationRequest  # sampler, CFG, step count and size of the hires pass
    first_size: tuple[int, int]  # (width, height) of the first pass


def _batch_seeds(request: GenerationRequest, first: int) -> list[int]:
    """A1111's seeds for a batch: one more per image, or all the same seed when a variation
    seed varies them (their subseeds count up instead)."""
    if request.varies:
        return [request.seed] * request.batch_size
    return [request.seed + first + i for i in range(request.batch_size)]


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """(batch, channels, h, w) latents decoded by the pipeline's VAE into images (FLUX's VAE
    also shifts them back)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor + shift
    pixels = vae.decode(scaled, return_dict=False)[0]
    return list(pipe.image_processor.postprocess(pixels, output_type="pil"))


def resolve_seed(seed: int) -> int:
    return random.randint(0, MAX_SEED) if seed == -1 else seed


class Engine:
    """Holds one loaded model and turns requests into images; thread-safe (one job at a time)."""

    def __init__(self, settings: Settings, settings_file: SettingsFile | None = None) -> None:
        self.settings = settings
        # where options and the last model are saved; None (CLI, tests): nothing is written
        self.settings_file = settings_file
        self._lock = threading.Lock()
        self._interrupt = threading.Event()
        self._model: LoadedModel | None = None
        self.hashes = HashCache(settings.cache_dir / "hashes.json")
        self.catalog = NetworkCatalog(settings.loras_dir, settings.cache_dir / "catalog.json")
        self._networks: LoraBackends | None = None
        # a LoRA file's trigger words; the Networks tab turns on the library's lookup
        self.trigger_words: TriggerWordSource = no_trigger_words
        self.last_networks: list[ChosenNetwork] = []  # the set the last generation applied
        self.embeddings = EmbeddingLibrary(settings.embeddings_dir)
        self._embeddings_now: list[Embedding] = []  # what this generation's prompts may name
        self._counter: tuple[object, Any] | None = None  # (pipeline, its tokenizer's copy)
        self._img2img: tuple[object, Any] | None = None  # (pipeline, its img2img twin)

    def use_catalog_trigger_words(self) -> None:
        """Auto trigger words come from the LoRA library's catalog from now on."""
        self.trigger_words = self.catalog.trigger_words

    def trigger_words_of(self, path: Path) -> tuple[str, ...]:
        """The trigger words auto-applied for one LoRA file (none until the library is used)."""
        return tuple(self.trigger_words(path))

    # -- models -------------------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def checkpoints(self) -> list[CheckpointFile]:
        return find_checkpoints(self.settings.models_dir)

    def model_choices(self) -> list[str]:
        """Names for the model dropdown; the demo model when `models/` holds none."""
        names = [c.name for c in self.checkpoints()]
        return names or [DEMO_MODEL_NAME]

    def model_picker_choices(self) -> list[tuple[str, str]]:
        """(label, name) pairs for the model dropdown: labels say "v-pred", values stay names."""
        pairs = [(c.picker_label, c.name) for c in self.checkpoints()]
        return pairs or [(DEMO_MODEL_NAME, DEMO_MODEL_NAME)]

    def load(self, name: str) -> LoadedModel:
        """Load a checkpoint by name (or the demo model), replacing the current one."""
        with self._lock:
            if self._model is not None and self._model.name == name:
                return self._model
            device, dtype = self.settings.torch_device(), self.settings.torch_dtype()
            if name == DEMO_MODEL_NAME:
                self._unload()
                loaded = self._load_demo(device, dtype)
            else:
                matches = [c for c in self.checkpoints() if c.name == name]
                if not matches:
                    raise CheckpointError(
                        f"no checkpoint named {name!r} in {self.settings.models_dir}"
                    )
                self._unload()
                loaded = load_checkpoint(
                    matches[0],
                    device,
                    dtype,
                    self.settings.lowvram,
                    fp8_storage=self.settings.fp8_storage.keeps_fp8(device),
                )
            self._model = loaded
            self._networks = None
            self._on_loaded(loaded, remember=True)
            return loaded

    def load_path(self, path: Path) -> LoadedModel:
        """Load a checkpoint file or diffusers folder from anywhere on disk."""
        checkpoint = checkpoint_from_path(path)
        with self._lock:
            self._unload()
            device = self.settings.torch_device()
            self._model = load_checkpoint(
                checkpoint,
                device,
                self.settings.torch_dtype(),
                self.settings.lowvram,
                fp8_storage=self.settings.fp8_storage.keeps_fp8(device),
            )
            self._on_loaded(self._model, remember=False)
            return self._model

    def _unload(self) -> None:
        """Drop the model and its LoRA state and give their memory back before the next load:
        a pipeline holds reference cycles, which only the cyclic collector frees."""
        self._model, self._networks, self._counter, self._img2img = None, None, None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load_default(self) -> LoadedModel:
        """The model `default_model` names."""
        return self.load(self.default_model())

    def default_model(self) -> str:
        """The model loaded last (saved in the settings file) while it is still in `models/`,
        else the first checkpoint, or the demo model when there is none. A new file in
        `models/` (a bake, say) never changes it while the last model is still there."""
        choices = self.model_choices()
        last = self.settings_file.load().last_model if self.settings_file else None
        return last if last in choices else choices[0]

    def _on_loaded(self, model: LoadedModel, *, remember: bool) -> None:
        """One log line; no diffusers progress bar (the UI and CLI show their own); the model
        remembered for the next start when it is one of `models/`."""
        model.pipe.set_progress_bar_config(disable=True)
        log.info(
            "model loaded: %s (%s, %s, %s)",
            model.name,
            model.kind.label,
            model.device.type,
            model.precision,
        )
        if remember and self.settings_file is not None:
            self.settings_file.save(last_model=model.name)

    def update_options(self, **changes: Any) -> Settings:
        """Change server-wide options (`SAVED_OPTIONS`) and save them to the settings file."""
        unknown = set(changes) - set(SAVED_OPTIONS)
        if unknown:
            raise ValueError(f"not a saved option: {', '.join(sorted(unknown))}")
        self.settings = replace(self.settings, **changes)
        if self.settings_file is not None:
            self.settings_file.save(self.settings)
        return self.settings

    def _load_demo(self, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        pipe = build_pipeline(ModelSpec(Arch.SD1))
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        place_pipeline(pipe, device, lowvram=False)
        return LoadedModel(
            pipe, ModelKind(Arch.SD1, Prediction.EPSILON), DEMO_MODEL_NAME, None, device, dtype
        )

    def generation_controls(self) -> GenerationControls:
        """What txt2img offers for the loaded model's family (SD1's before a model loads)."""
        model = self._model
        return controls_for(model.kind if model else ModelKind(Arch.SD1, Prediction.EPSILON))

    def count_tokens(self, text: str) -> TokenCount:
        """The prompt's tokens as the encoder reading its words gets them (tags removed): CLIP
        chunks, or T5 on FLUX.1, with the loaded model's tokenizer, or the reference CLIP one
        before a model loads."""
        model = self._model
        if model is None:
            return count_tokens(reference_tokenizer(), text)
        encoder = controls_for(model.kind).prompt_encoder
        if self._counter is None or self._counter[0] is not model.pipe:
            # a copy: a Rust tokenizer used from two threads at once can fail ("Already borrowed")
            tokenizer = getattr(model.pipe, encoder.tokenizer_component)
            self._counter = (model.pipe, copy.deepcopy(tokenizer))
        return count_for(encoder, self._counter[1], text)

    # -- generation ---------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Stop the running job after its current step; finished images are kept."""
        self._interrupt.set()

    def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback | None = None
    ) -> GenerationResult:
        """Render `request` with the loaded model. Raises RequestError or NoModelError."""
        request.validate()
        # parsed before taking the lock: a long prompt never holds up the job running now
        prompts = parse_prompt(request.prompt), parse_prompt(request.negative_prompt)
        with self._lock:
            if self._model is None:
                raise NoModelError("no model is loaded")
            self._interrupt.clear()
            return self._generate(self._model, request, prompts, on_progress)

    def _generate(
        self,
        model: LoadedModel,
        request: GenerationRequest,
        prompts: tuple[ParsedPrompt, ParsedPrompt],
        on_progress: ProgressCallback | None,
    ) -> GenerationResult:
        started = time.perf_counter()
        prompt, negative = prompts
        warnings = [*prompt.errors, *negative.errors]
        recipe = recipe_for(model.kind)
        request = recipe.resolve(replace(request, seed=resolve_seed(request.seed)), warnings)
        if request.varies:
            request = replace(request, subseed=resolve_seed(request.subseed))
        if request.hires is not None and not recipe.runs_hires:
            warnings.append(
                f"hires fix is not available for {model.kind.label} models yet; the image is "
                f"rendered at {request.width}x{request.height}"
            )
            request = replace(request, hires=None)
        warnings += [f"{tag.text} in the negative prompt is ignored" for tag in negative.tags]
        routes = self._apply_networks(model, request, prompt.tags, warnings, on_progress)
        applied = [routed for routed in routes if routed.route.applied]
        self.last_networks = applied
        triggers = add_trigger_words(
            prompt.text,
            [self.trigger_words(routed.network.path) for routed in applied],
            _first_set(request.auto_trigger_words, self.settings.auto_trigger_words),
        )
        texts = replace(request, prompt=triggers.prompt, negative_prompt=negative.text)
        self._embeddings_now = self._usable_embeddings(model, applied, warnings)
        ti_hashes = self._ti_hashes(model, texts)
        pipe = model.pipe
        pipe.scheduler = recipe.scheduler(pipe.scheduler.config, request)
        second = self._second_pass(model, request, prompt, warnings)
        if second is not None and second.settings.hires.sampler:  # the infotext's, as it ran
            hires = replace(second.settings.hires, sampler=second.settings.sampler)
            request = replace(request, hires=hires)
        images: list[GeneratedImage] = []
        interrupted = False
        pass_steps = request.steps + (second.schedule.steps if second else 0)
        total_steps = pass_steps * request.batch_count
        for batch in range(request.batch_count):
            first = batch * request.batch_size
            seeds = _batch_seeds(request, first)
            subseeds = [request.subseed + first + i for i in range(request.batch_size)]
            if second is not None and batch and second.networks is not None:
                self._apply_networks(model, request, prompt.tags, [], on_progress)
            if self._networks is not None and self._networks.is_scheduled:
                self._networks.set_step(1, request.steps)  # each batch starts from step 1
            done = batch * pass_steps
            callback = self._step_callback(
                model, texts, first, _Span(done, request.steps, total_steps), on_progress
            )
            # one CPU generator per image: the same seed gives the same image on any device
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            noise = self._initial_noise(model, request, seeds, subseeds, generators)
            output = pipe(
                **self._prompt_embeddings(model, texts),
                **recipe.guidance(request),
                **noise,
                num_inference_steps=request.steps,
                width=request.width,
                height=request.height,
                generator=generators,
                callback_on_step_end=callback,
                output_type="latent" if second else "pil",
            )
            batch_images = output.images
            if second is not None:
                batch_images = recipe.unpack_latents(pipe, batch_images, *second.first_size)
            if second is not None and not self._interrupt.is_set():
                span = _Span(done + request.steps, second.schedule.steps, total_steps)
                batch_images = self._run_second_pass(
                    model,
                    second,
                    texts,
                    batch_images,
                    seeds,
                    first,
                    span,
                    on_progress,
                    warnings if batch == 0 else [],
                )
            elif second is not None:
                batch_images = decode_latents(pipe, batch_images)
            for image, seed, subseed in zip(batch_images, seeds, subseeds, strict=True):
                infotext = self.infotext(
                    model,
                    replace(request, subseed=subseed),
                    seed,
                    applied,
                    triggers.added,
                    ti_hashes=ti_hashes,
                )
                images.append(
                    GeneratedImage(image, seed, infotext, self._save(image, infotext, seed))
                )
            if self._interrupt.is_set():
                interrupted = True
                break
        return GenerationResult(
            images,
            warnings,
            interrupted,
            time.perf_counter() - started,
            tuple(r.route for r in routes),
        )

    def _apply_networks(
        self,
        model: LoadedModel,
        request: GenerationRequest,
        tags: tuple[NetworkTag, ...],
        warnings: list[str],
        on_progress: ProgressCallback | None = None,
    ) -> list[RoutedNetwork]:
        """Apply the prompt's networks at step 1, each through its backend (or restore the model
        when there are none). Problems with one network become warnings; the others apply.
        Progress is reported in modules written, at most once per percent."""
        if tags and not recipe_for(model.kind).applies_loras:
            names = ", ".join(tag.text for tag in tags)
            warnings.append(
                f"LoRAs are not applied to {model.kind.label} models yet: {names} ignored"
            )
            return []
        chosen = choose_networks(tags, self.catalog, warnings)
        if self._networks is None:
            if not chosen:
                return []
            self._networks = LoraBackends(
                model.pipe,
                model.kind.arch,
                fuse=self.settings.lora_fuse,
                # a low-memory setup gets the patched copies' memory back as soon as LoRAs are off
                keep_spares=not self.settings.lowvram,
            )
        choice = request.lora_backend or self.settings.lora_backend
        routed = self._networks.apply(
            chosen, choice, total_steps=request.steps, on_progress=_module_progress(on_progress)
        )
        warnings.extend(routed.warnings)
        return [
            RoutedNetwork(c.name, c.network, c.strengths, route)
            for c, route in zip(chosen, routed.routes, strict=True)
        ]

    @staticmethod
    def embedding_widths(model: LoadedModel | None) -> tuple[int, ...] | None:
        """The token-embedding widths of the model's text encoders, which an embedding must
        match; None when there is no model or its family takes no textual inversions."""
        if model is None or not recipe_for(model.kind).uses_embeddings:
            return None
        encoders = [model.pipe.text_encoder, getattr(model.pipe, "text_encoder_2", None)]
        return tuple(token_embedding(te).embedding_dim for te in encoders if te is not None)

    def _usable_embeddings(
        self, model: LoadedModel, applied: Sequence[ChosenNetwork], warnings: list[str]
    ) -> list[Embedding]:
        """The folder's embeddings and those bundled in the applied LoRAs that fit the model's
        text encoders; unreadable ones become warnings."""
        widths = self.embedding_widths(model)
        if widths is None:
            return []
        loras = [(a.name, a.network.path) for a in applied]
        usable, problems = self.embeddings.active(widths, loras)
        warnings.extend(problems)
        return usable

    def _ti_hashes(self, model: LoadedModel, request: GenerationRequest) -> list[tuple[str, str]]:
        """(name, hash) of each embedding the prompts use, for the infotext's `TI hashes`."""
        used = embeddings_in_prompts(
            model.pipe.tokenizer, [request.prompt, request.negative_prompt], self._embeddings_now
        )
        by_name = {embedding.name: embedding.short_hash for embedding in self._embeddings_now}
        return [(name, by_name[name]) for name in used]

    def _prompt_embeddings(self, model: LoadedModel, request: GenerationRequest) -> dict[str, Any]:
        """Prompt and negative prompt encoded A1111's way (emphasis, BREAK, 75-token chunks,
        textual-inversion embeddings) with the text encoders as they are patched now, as
        pipeline keyword arguments; each family's recipe encodes its own way."""
        return recipe_for(model.kind).conditioning(model.pipe, request, self._embeddings_now)

    def _step_callback(
        self,
        model: LoadedModel,
        request: GenerationRequest,
        first_image: int,
        span: _Span,
        on_progress: ProgressCallback | None,
        *,
        scheduled: bool = True,
    ) -> Callable[..., dict[str, Any]]:
        """Progress over the whole request, scheduled LoRA strengths moved each step (first pass
        only: `scheduled`), the interrupt honoured."""

        def callback(
            pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            # second-order samplers call back more than once per step; report whole steps
            loop_len = max(getattr(pipe, "num_timesteps", span.steps), 1)
            done = min(span.steps, round((step + 1) * span.steps / loop_len))
            if on_progress is not None:
                preview = self._preview(model, request, tensors.get("latents"), done)
                on_progress(Progress(span.offset + done, span.total, first_image, preview=preview))
            if scheduled and done < span.steps:
                tensors.update(self._next_step(model, request, done + 1))
            if self._interrupt.is_set():
                pipe._interrupt = True  # diffusers skips the remaining steps, then decodes
            return tensors

        return callback

    def _preview(
        self, model: LoadedModel, request: GenerationRequest, latents: Any, done: int
    ) -> Image.Image | None:
        """The first image's cheap preview every `live_preview_every` steps (0: never)."""
        every = self.settings.live_preview_every
        if latents is None or every <= 0 or done % every:
            return None
        latents = recipe_for(model.kind).unpack_latents(
            model.pipe, latents, request.width, request.height
        )
        return approximate(latents[0], model.kind.arch)

    def _initial_noise(
        self,
        model: LoadedModel,
        request: GenerationRequest,
        seeds: Sequence[int],
        subseeds: Sequence[int],
        generators: Sequence[torch.Generator],
    ) -> dict[str, Any]:
        """The pipeline's `latents` argument when a variation seed changes the noise (A1111's
        blend, drawn on the CPU); empty otherwise, so the pipeline draws its own as before."""
        if not request.varies:
            return {}
        recipe = recipe_for(model.kind)
        shape = recipe.noise_shape(model.pipe, request)
        noise = variation_noise(seeds, subseeds, request.subseed_strength, shape, generators)
        return {"latents": recipe.pack_noise(model.pipe, noise.to(model.dtype))}

    def _second_pass(
        self,
        model: LoadedModel,
        request: GenerationRequest,
        prompt: ParsedPrompt,
        warnings: list[str],
    ) -> _SecondPass | None:
        """What the hires pass needs, prepared once per request; None without hires fix."""
        hires = request.hires
        if hires is None:
            return None
        pipe = self._img2img_pipe(model)
        recipe = recipe_for(model.kind)
        steps = hires.steps or request.steps
        schedule = second_pass_schedule(steps, hires.denoising_strength, recipe.img2img_rounding)
        hr_prompt = parse_prompt(hires.prompt) if hires.prompt else prompt
        hr_negative = parse_prompt(hires.negative_prompt) if hires.negative_prompt else None
        if hr_prompt is not prompt:
            warnings.extend(hr_prompt.errors)
        if hr_negative is not None:
            warnings.extend(hr_negative.errors)
        networks = hr_prompt.tags if hr_prompt.tags != prompt.tags else None
        cfg = request.cfg_scale if hires.cfg_scale is None else hires.cfg_scale
        negative = hr_negative.text if hr_negative is not None else request.negative_prompt
        asked = replace(
            request,
            sampler=hires.sampler or request.sampler,
            cfg_scale=cfg,
            distilled_cfg_scale=hires.distilled_cfg(request.distilled_cfg_scale),
            steps=schedule.steps,
            negative_prompt=negative,
        )
        notes: list[str] = []
        settings = recipe.resolve(asked, notes)  # the family's own sampler and CFG rules
        warnings.extend(f"hires fix: {note}" for note in notes if note not in warnings)
        width, height = hires.size(request.width, request.height, recipe.size_multiple).target
        settings = replace(settings, width=width, height=height)
        first_size = (request.width, request.height)
        return _SecondPass(pipe, schedule, hr_prompt, hr_negative, networks, settings, first_size)

    def _img2img_pipe(self, model: LoadedModel) -> Any:
        """An img2img pipeline over the loaded model's own components (no weights loaded)."""
        cached = self._img2img
        if cached is not None and cached[0] is model.pipe:
            return cached[1]
        from diffusers import AutoPipelineForImage2Image

        pipe = AutoPipelineForImage2Image.from_pipe(model.pipe)
        pipe.set_progress_bar_config(disable=True)
        self._img2img = (model.pipe, pipe)
        return pipe

    def _run_second_pass(
        self,
        model: LoadedModel,
        second: _SecondPass,
        texts: GenerationRequest,
        latents: torch.Tensor,
        seeds: Sequence[int],
        first_image: int,
        span: _Span,
        on_progress: ProgressCallback | None,
        warnings: list[str],
    ) -> list[Image.Image]:
        """Upscale the first pass's latents and denoise them again (A1111's hires fix): the
        hires prompt's networks applied at their final strengths, the same seeds' noise."""
        hires = second.settings.hires
        assert hires is not None
        prompt_text = texts.prompt
        if second.networks is not None:
            routes = self._apply_networks(
                model, second.settings, second.networks, warnings, on_progress
            )
            if self._networks is not None and self._networks.is_scheduled:
                # schedules cover the first pass; the hires pass runs at their final strengths
                self._networks.set_step(second.settings.steps, second.settings.steps)
            prompt_text = add_trigger_words(
                second.prompt.text,
                [self.trigger_words(r.network.path) for r in routes if r.route.applied],
                _first_set(texts.auto_trigger_words, self.settings.auto_trigger_words),
            ).prompt
        elif hires.prompt:
            prompt_text = add_trigger_words(
                second.prompt.text,
                [self.trigger_words(n.network.path) for n in self.last_networks],
                _first_set(texts.auto_trigger_words, self.settings.auto_trigger_words),
            ).prompt
        negative = second.negative.text if second.negative is not None else texts.negative_prompt
        hr_texts = replace(second.settings, prompt=prompt_text, negative_prompt=negative)
        recipe = recipe_for(model.kind)
        upscaler = get_upscaler(hires.upscaler)
        size = hires.size(texts.width, texts.height, recipe.size_multiple)
        if upscaler.in_latent_space:
            image: Any = hires_upscale.upscale_latents(latents, upscaler, size)
        else:
            image = [
                hires_upscale.upscale_image(decoded, upscaler, size)
                for decoded in decode_latents(model.pipe, latents)
            ]
        pipe = second.pipe
        pipe.scheduler = recipe.scheduler(model.pipe.scheduler.config, hr_texts)
        callback = self._step_callback(
            model, hr_texts, first_image, span, on_progress, scheduled=False
        )
        output = pipe(
            **self._prompt_embeddings(model, hr_texts),
            **recipe.guidance(hr_texts),
            **recipe.img2img_size(*size.target),
            image=image,
            strength=second.schedule.strength,
            num_inference_steps=second.schedule.num_inference_steps,
            # A1111: the hires pass's noise comes from the same seeds
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            callback_on_step_end=callback,
        )
        return list(output.images)

    def _next_step(
        self, model: LoadedModel, request: GenerationRequest, step: int
    ) -> dict[str, Any]:
        """Move scheduled strengths to `step`; when a text encoder changed, the prompt is encoded
        again and the pipeline uses the new embeddings from this step on."""
        patcher = self._networks
        if patcher is None or not patcher.is_scheduled:
            return {}
        report = patcher.set_step(step, request.steps)
        if report is None or not report.components_changed - {Component.UNET}:
            return {}
        return self._cfg_embeddings(model, request)

    def _cfg_embeddings(self, model: LoadedModel, request: GenerationRequest) -> dict[str, Any]:
        """Prompt embeddings shaped as the denoising loop holds them (negative then positive
        when classifier-free guidance is on)."""
        args = self._prompt_embeddings(model, request)
        guided = request.cfg_scale > 1

        def stacked(negative: str, positive: str) -> torch.Tensor:
            return torch.cat([args[negative], args[positive]]) if guided else args[positive]

        out = {"prompt_embeds": stacked("negative_prompt_embeds", "prompt_embeds")}
        if "pooled_prompt_embeds" in args:
            out["add_text_embeds"] = stacked(
                "negative_pooled_prompt_embeds", "pooled_prompt_embeds"
            )
        return out

    def infotext(
        self,
        model: LoadedModel,
        request: GenerationRequest,
        seed: int,
        applied: Sequence[ChosenNetwork] | None = None,
        trigger_words: tuple[str, ...] = (),
        *,
        ti_hashes: Sequence[tuple[str, str]] = (),
    ) -> Infotext:
        """A1111-format parameters for one image; the prompt keeps its tags as typed.
        `ti_hashes`: (name, hash) of the embeddings used, written as A1111's `TI hashes`."""
        recipe = recipe_for(model.kind)
        params: dict[str, str] = {
            "Steps": str(request.steps),
            **recipe.sampling_fields(request),
            "Seed": str(seed),
            "Size": f"{request.width}x{request.height}",
        }
        short_hash = self.hashes.model_hash(model.path)
        if short_hash:
            params["Model hash"] = short_hash
        params["Model"] = Path(model.name).name
        params.update(
            model_schedule_fields(model.kind.prediction is Prediction.V, model.kind.zero_snr)
        )
        if request.varies:  # A1111 writes both only when the strength is not 0
            params["Variation seed"] = str(request.subseed)
            params["Variation seed strength"] = f"{request.subseed_strength:g}"
        if request.clip_skip > 1:
            params["Clip skip"] = str(request.clip_skip)
        if request.hires is not None:
            params.update(hires_fields(request.hires, request.prompt, request.negative_prompt))
        hashes = [f"{a.name}: {a.network.autov3}" for a in applied or [] if a.network.autov3]
        if hashes:
            params["Lora hashes"] = ", ".join(hashes)
        if ti_hashes:
            # A1111 drops ":" and "," from names so the list stays parseable
            params["TI hashes"] = ", ".join(
                f"{name.replace(':', '').replace(',', '')}: {short}" for name, short in ti_hashes
            )
        backends = [
            f"{a.name}={a.route.backend.value}"
            for a in applied or []
            if isinstance(a, RoutedNetwork) and a.route is not None
        ]
        if backends:
            params["Lora backend"] = ", ".join(dict.fromkeys(backends))  # a name twice: once
        if trigger_words:
            params["Trigger words"] = ", ".join(trigger_words)
        params["Version"] = APP_VERSION
        params.update(recipe.module_fields(model.parts))  # Forge writes them after the version
        return Infotext(request.prompt, request.negative_prompt, params)

    def save_grid(self, result: GenerationResult) -> GeneratedImage | None:
        """The grid of a run of several images (A1111's layout), with the first image's seed
        and infotext; saved to `txt2img-grids/DATE/` when saving is on. None for one image."""
        if len(result.images) < 2:
            return None
        first = result.images[0]
        grid = image_grid([generated.image for generated in result.images])
        path = self._save(grid, first.infotext, first.seed, GRIDS_SUBFOLDER)
        return GeneratedImage(grid, first.seed, first.infotext, path)

    def _save(
        self, image: Image.Image, infotext: Infotext, seed: int, subfolder: str = OUTPUTS_SUBFOLDER
    ) -> Path | None:
        if not self.settings.save_outputs:
            return None
        return self.save_image(image, infotext, seed, subfolder)

    def save_image(
        self, image: Image.Image, infotext: Infotext, seed: int, subfolder: str = OUTPUTS_SUBFOLDER
    ) -> Path:
        """Write one image with its infotext to `outputs/<subfolder>/DATE/NNNNN-SEED.png`,
        whatever `save_outputs` says (the gallery's Save button)."""
        folder = self.settings.outputs_dir / subfolder / time.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{next_image_number(folder):05d}-{seed}.png"
        save_png(image, path, infotext)
        return path


def next_image_number(folder: Path) -> int:
    """A1111's numbering: one more than the highest `NNNNN-` prefix in the folder (0 when none),
    so a deleted image never makes a number come back while later ones exist."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1
