"""The `/sdapi/v1` routes, named and shaped as AUTOMATIC1111's so its clients work unchanged.
Generation and model loads go through the engine's job queue, shared with the UI."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from webui.api.auth import Credential, basic_auth
from webui.api.checkpoint_titles import CheckpointTitle, checkpoint_titles, find_checkpoint
from webui.api.infotext_fields import a1111_fields
from webui.api.models import (
    LoraItem,
    Options,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    SamplerItem,
    SDModelItem,
    Txt2ImgRequest,
    Txt2ImgResponse,
)
from webui.engine.checkpoints import CheckpointError
from webui.engine.generate import (
    APP_VERSION,
    Engine,
    GenerationRequest,
    GenerationResult,
    RequestError,
)
from webui.engine.infotext import (
    PNG_TEXT_KEY,
    ImageTooLargeError,
    open_image,
    png_info,
    read_image_parameters,
)
from webui.engine.jobs import JobQueue
from webui.engine.samplers import SAMPLERS
from webui.networks.format import NetworkFileError, read_metadata
from webui.settings import LIMITS

# Infotext keys that A1111 keeps in fields of its own rather than in `extra_generation_params`.
_CORE_PARAMS = {"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "Version"}
_IGNORED = {
    "restore_faces": "face restoration is not supported",
    "tiling": "tiling is not supported",
}


def field_error(loc: Sequence[str], message: str, value: Any) -> RequestValidationError:
    """A 422 shaped like FastAPI's own validation errors, for checks that need the server."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", *loc), "msg": message, "input": value}]
    )


def encode_png(image: Image.Image, text_chunks: PngInfo) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=text_chunks)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str, max_pixels: int = LIMITS.max_image_pixels) -> Image.Image:
    """A base64 image, optionally as a `data:` URL, of at most `max_pixels` (checked before
    its pixels are decoded). Raises a 422 naming `image`."""
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        image = open_image(io.BytesIO(base64.b64decode(payload, validate=True)), max_pixels)
    except ImageTooLargeError as exc:
        raise field_error(["image"], str(exc), data[:40]) from exc
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
        raise field_error(["image"], f"not a base64-encoded image: {exc}", data[:40]) from exc
    return image


def lora_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """Safetensors metadata as A1111 lists it: values that hold a JSON object are parsed."""
    parsed: dict[str, Any] = {}
    for key, value in metadata.items():
        parsed[key] = value
        if value.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):  # else kept as the text it is
                parsed[key] = json.loads(value)
    return parsed


def _read_lora_metadata(path: Path) -> dict[str, Any]:
    try:
        return lora_metadata(read_metadata(path))
    except (NetworkFileError, OSError):
        return {}  # listed all the same, as the Networks tab lists it


def generation_info(
    body: Txt2ImgRequest, request: GenerationRequest, result: GenerationResult, model: str | None
) -> dict[str, Any]:
    """The `info` object A1111 returns with generated images; `model` names the model only
    when no image (whose infotext names it) was made."""
    seeds = [image.seed for image in result.images]
    # the subseeds the images used (A1111 lists them even when the strength is 0)
    subseeds = [int(i.infotext.params.get("Variation seed", body.subseed)) for i in result.images]
    infotexts = [image.infotext for image in result.images]
    params = dict(infotexts[0].params) if infotexts else {}
    count = len(result.images)
    warnings = [*result.warnings]
    warnings += [note for name, note in _IGNORED.items() if getattr(body, name)]
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": seeds[0] if seeds else request.seed,
        "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else body.subseed,
        "all_subseeds": subseeds,
        "subseed_strength": body.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": params.get("Sampler", request.sampler),
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": params.get("Model", model),
        "sd_model_hash": params.get("Model hash"),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": request.hires.denoising_strength if request.hires else None,
        "extra_generation_params": {k: v for k, v in params.items() if k not in _CORE_PARAMS},
        "index_of_first_image": 0,
        "infotexts": [text.format() for text in infotexts],
        "styles": body.styles or [],
        "job_timestamp": "",
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": APP_VERSION,
        "interrupted": result.interrupted,
        "warnings": warnings,
    }


class A1111Api:
    """The routes' state: the engine, its job queue, and the options set through the API."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.jobs = JobQueue.for_engine(engine)
        self.clip_skip = 1  # CLIP_stop_at_last_layers, as set by POST /options
        # each listed LoRA's parsed metadata, keyed by the file version the catalog last saw
        self._lora_metadata: dict[tuple[Path, int, float], dict[str, Any]] = {}

    def checkpoint(self, wanted: str, loc: Sequence[str]) -> CheckpointTitle:
        """The checkpoint a client names, or a 422 at `loc` listing the known titles."""
        titles = checkpoint_titles(self.engine)
        found = find_checkpoint(titles, wanted)
        if found is None:
            known = ", ".join(t.title for t in titles)
            raise field_error(loc, f"unknown checkpoint {wanted!r}; known: {known}", wanted)
        return found

    def current_title(self) -> CheckpointTitle:
        """The loaded checkpoint, else the one the first generation will load."""
        titles = checkpoint_titles(self.engine)
        loaded = self.engine.model
        name = loaded.name if loaded is not None else self.engine.default_model()
        return next((t for t in titles if t.engine_name == name), titles[0])

    def txt2img(self, body: Txt2ImgRequest) -> Txt2ImgResponse:
        wanted = (body.override_settings or Options()).sd_model_checkpoint
        loc = ["override_settings", "sd_model_checkpoint"]
        model = self.checkpoint(wanted, loc).engine_name if wanted else None
        request = body.generation_request(self.clip_skip)
        try:
            result = self.jobs.generate(request, model=model)
        except RequestError as exc:  # the body's validators should have caught it first
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
        except CheckpointError as exc:
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc)) from exc
        images = (
            [encode_png(i.image, png_info(i.infotext)) for i in result.images]
            if body.send_images
            else []
        )
        # the images' infotexts name the model; the checkpoints are listed only when none was made
        fallback = None if result.images else self.current_title().model_name
        info = generation_info(body, request, result, fallback)
        return Txt2ImgResponse(
            images=images, parameters=body.model_dump(mode="json"), info=json.dumps(info)
        )

    def loras(self) -> list[LoraItem]:
        """The catalog's LoRAs; a file's header is read once per version the catalog lists."""
        known: dict[tuple[Path, int, float], dict[str, Any]] = {}
        items = []
        for entry in self.engine.catalog.index.entries():
            version = (entry.path, entry.size, entry.mtime)
            metadata = self._lora_metadata.get(version)
            known[version] = metadata if metadata is not None else _read_lora_metadata(entry.path)
            items.append(
                LoraItem(
                    name=entry.name,
                    alias=entry.alias or entry.name,
                    path=str(entry.path),
                    metadata=known[version],
                )
            )
        self._lora_metadata = known  # files gone or changed since are dropped
        return items

    def refresh_loras(self) -> dict[str, Any]:
        # an empty object rather than A1111's null: webuiapi's custom_post needs an object
        self.engine.catalog.refresh()
        return {}

    # progress and interrupt run on the event loop, never behind requests waiting for a thread
    async def interrupt(self) -> dict[str, Any]:
        self.jobs.interrupt()
        return {}

    def sd_models(self) -> list[SDModelItem]:
        return [
            SDModelItem(
                title=t.title,
                model_name=t.model_name,
                hash=t.short_hash,
                sha256=t.sha256,
                filename=t.filename,
            )
            for t in checkpoint_titles(self.engine)
        ]

    def options(self) -> dict[str, Any]:
        current = self.current_title()
        return {
            "sd_model_checkpoint": current.title,
            "sd_checkpoint_hash": current.sha256,
            "CLIP_stop_at_last_layers": self.clip_skip,
        }

    def set_options(self, body: Options) -> None:
        if body.sd_model_checkpoint:
            wanted = self.checkpoint(body.sd_model_checkpoint, ["sd_model_checkpoint"])
            try:
                self.jobs.load(wanted.engine_name)
            except CheckpointError as exc:
                raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc)) from exc
        if body.CLIP_stop_at_last_layers is not None:
            self.clip_skip = body.CLIP_stop_at_last_layers

    async def progress(self) -> ProgressResponse:
        return ProgressResponse.of(self.jobs.status())

    def png_info(self, body: PNGInfoRequest) -> PNGInfoResponse:
        image = decode_image(body.image)
        text = read_image_parameters(image) or ""
        items = {k: v for k, v in image.info.items() if k != PNG_TEXT_KEY and isinstance(v, str)}
        return PNGInfoResponse(
            info=text, items=items, parameters=a1111_fields(text) if text else {}
        )


def api_router(engine: Engine, credentials: Sequence[Credential] = ()) -> APIRouter:
    """All `/sdapi/v1` routes over `engine`, behind HTTP basic auth when `credentials` given."""
    api = A1111Api(engine)
    router = APIRouter(prefix="/sdapi/v1", dependencies=[Depends(basic_auth(credentials))])
    router.add_api_route(
        "/txt2img",
        api.txt2img,
        methods=["POST"],
        response_model=Txt2ImgResponse,
        summary="Render images; waits its turn in the queue shared with the UI",
    )
    router.add_api_route("/loras", api.loras, methods=["GET"], response_model=list[LoraItem])
    router.add_api_route("/refresh-loras", api.refresh_loras, methods=["POST"])
    router.add_api_route(
        "/sd-models", api.sd_models, methods=["GET"], response_model=list[SDModelItem]
    )
    router.add_api_route("/refresh-checkpoints", _refresh_checkpoints, methods=["POST"])
    router.add_api_route("/options", api.options, methods=["GET"])
    router.add_api_route(
        "/options",
        api.set_options,
        methods=["POST"],
        summary="Set options; sd_model_checkpoint loads that model",
    )
    router.add_api_route("/samplers", _samplers, methods=["GET"], response_model=list[SamplerItem])
    router.add_api_route(
        "/progress", api.progress, methods=["GET"], response_model=ProgressResponse
    )
    router.add_api_route("/interrupt", api.interrupt, methods=["POST"])
    router.add_api_route(
        "/png-info", api.png_info, methods=["POST"], response_model=PNGInfoResponse
    )
    router.add_api_route("/scripts", _scripts, methods=["GET"])
    return router


def _refresh_checkpoints() -> dict[str, Any]:
    """Checkpoints are found anew on every listing; nothing to refresh."""
    return {}


def _samplers() -> list[SamplerItem]:
    return [
        SamplerItem(
            name=s.name,
            aliases=list(s.aliases),
            options={key: str(value) for key, value in s.options.items()},
        )
        for s in SAMPLERS
    ]


def _scripts() -> dict[str, list[str]]:
    """No scripts (A1111 clients ask, to see which extensions exist)."""
    return {"txt2img": [], "img2img": []}
