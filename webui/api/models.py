"""Request and response bodies of the A1111-compatible API: the same field names, defaults and
JSON shapes as AUTOMATIC1111's `/sdapi/v1`, so its clients work unchanged.

Range checks come from the engine (`GenerationRequest.validate`), one field at a time, so a bad
field gets a 422 that names it. Fields A1111 clients send that this app does not use (hires fix,
face restoration, scripts, ...) are accepted and ignored."""

from __future__ import annotations

import base64
import io
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from webui.engine.generate import GenerationRequest, RequestError
from webui.engine.hires import UPSCALER_NAMES, HiresFix
from webui.engine.jobs import JobStatus
from webui.engine.samplers import DEFAULT_SAMPLER, UnknownSamplerError, get_sampler


def check_with_engine(**fields: Any) -> None:
    """Run the engine's own range checks on these request fields (all others at their valid
    defaults); raises ValueError with the engine's message."""
    try:
        GenerationRequest(**{"prompt": "", **fields}).validate()
    except RequestError as exc:
        raise ValueError(str(exc)) from exc


class Options(BaseModel):
    """Options that can be set for one request (`override_settings`) or for all later ones
    (`POST /options`). Other A1111 options are accepted and ignored."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    sd_model_checkpoint: str | None = Field(
        None, description="checkpoint title, name or hash, as listed by /sdapi/v1/sd-models"
    )
    CLIP_stop_at_last_layers: int | None = Field(None, description="clip skip (1 = none)")

    @field_validator("CLIP_stop_at_last_layers")
    @classmethod
    def _clip_skip(cls, value: int | None) -> int | None:
        if value is not None:
            check_with_engine(clip_skip=value)
        return value


class Txt2ImgRequest(BaseModel):
    """`POST /sdapi/v1/txt2img`. LoRA tags go in the prompt: `<lora:NAME:WEIGHT>`."""

    # JSON from Python clients may hold NaN or Infinity: every float field must be finite
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = Field(None, description="accepted, ignored")
    seed: int = -1
    subseed: int = Field(-1, description="variation seed (-1: random)")
    subseed_strength: float = Field(0.0, description="variation strength, 0..1 (0: off)")
    scheduler: str | None = Field(None, description="schedule type: Automatic or Karras")
    sampler_name: str | None = Field(
        None, description=f"default: the model's ({DEFAULT_SAMPLER}; FLUX.1 Euler)"
    )
    sampler_index: str | None = Field(None, description="deprecated name of sampler_name")
    batch_size: int = 1
    n_iter: int = Field(1, description="batch count")
    steps: int = 50
    cfg_scale: float = Field(
        7.0, description="FLUX.1: above 1 is true CFG with the negative prompt"
    )
    distilled_cfg_scale: float = Field(3.5, description="FLUX.1 dev's guidance (Forge's field)")
    width: int = 512
    height: int = 512
    enable_hr: bool = Field(False, description="hires fix: a second, img2img pass (SD models)")
    hr_scale: float = Field(2.0, description="hires upscale factor (unless hr_resize_x/y)")
    hr_upscaler: str = Field("Latent", description=f"one of: {', '.join(UPSCALER_NAMES)}")
    hr_second_pass_steps: int = Field(0, description="hires steps (0: the same as steps)")
    hr_resize_x: int = Field(0, description="hires width (0: from hr_scale or hr_resize_y)")
    hr_resize_y: int = Field(0, description="hires height (0: from hr_scale or hr_resize_x)")
    denoising_strength: float | None = Field(None, description="hires denoising (default 0.7)")
    hr_prompt: str = Field("", description="hires prompt (empty: the prompt)")
    hr_negative_prompt: str = Field("", description="hires negative prompt")
    hr_sampler_name: str | None = Field(None, description="hires sampler (default: sampler)")
    hr_cfg: float | None = Field(None, description="hires CFG scale, Forge's (default: cfg_scale)")
    hr_distilled_cfg: float | None = Field(
        None,
        description="hires Distilled CFG Scale, Forge's (FLUX.1 dev; default: distilled_cfg_scale)",
    )
    restore_faces: bool | None = Field(None, description="accepted, ignored")
    tiling: bool | None = Field(None, description="accepted, ignored")
    override_settings: Options | None = None
    override_settings_restore_afterwards: bool = True
    send_images: bool = Field(True, description="false returns no images")
    save_images: bool = Field(False, description="accepted; the server's setting decides")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description="accepted, ignored")

    @field_validator(
        "prompt",
        "negative_prompt",
        "steps",
        "cfg_scale",
        "distilled_cfg_scale",
        "width",
        "height",
        "seed",
        "batch_size",
        "subseed",
        "subseed_strength",
    )
    @classmethod
    def _in_range(cls, value: Any, info: ValidationInfo) -> Any:
        check_with_engine(**{info.field_name: value})
        return value

    @field_validator("n_iter")
    @classmethod
    def _batch_count(cls, value: int) -> int:
        try:
            check_with_engine(batch_count=value)
        except ValueError as exc:
            raise ValueError(str(exc).replace("batch_count", "n_iter", 1)) from exc
        return value

    @field_validator("sampler_name", "sampler_index")
    @classmethod
    def _known_sampler(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            try:
                get_sampler(value, info.data.get("scheduler") or "")
            except UnknownSamplerError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @field_validator("hr_sampler_name")
    @classmethod
    def _known_hr_sampler(cls, value: str | None) -> str | None:
        if value:
            try:
                get_sampler(value)
            except UnknownSamplerError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @model_validator(mode="after")
    def _hires_in_range(self) -> Txt2ImgRequest:
        hires = self.hires_fix()
        if hires is not None:
            try:
                hires.validate(self.width, self.height)
            except RequestError as exc:
                raise ValueError(str(exc)) from exc
        return self

    def hires_fix(self) -> HiresFix | None:
        """The engine's hires settings, when `enable_hr` is on."""
        if not self.enable_hr:
            return None
        return HiresFix(
            scale=self.hr_scale,
            resize_x=self.hr_resize_x,
            resize_y=self.hr_resize_y,
            upscaler=self.hr_upscaler,
            steps=self.hr_second_pass_steps,
            denoising_strength=0.7 if self.denoising_strength is None else self.denoising_strength,
            prompt=self.hr_prompt,
            negative_prompt=self.hr_negative_prompt,
            sampler=self.hr_sampler_name or "",
            cfg_scale=self.hr_cfg,
            distilled_cfg_scale=self.hr_distilled_cfg,
        )

    @property
    def sampler(self) -> str:
        """The engine's sampler name: A1111's name plus the schedule type, when it has one;
        "" (the model's default) when the body names none."""
        name = self.sampler_name or self.sampler_index
        return get_sampler(name, self.scheduler or "").name if name else ""

    def generation_request(self, clip_skip: int) -> GenerationRequest:
        """The engine's request for this body, with `clip_skip` unless it overrides it."""
        overrides = self.override_settings or Options()
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            cfg_scale=self.cfg_scale,
            distilled_cfg_scale=self.distilled_cfg_scale,
            width=self.width,
            height=self.height,
            seed=self.seed,
            batch_size=self.batch_size,
            batch_count=self.n_iter,
            sampler=self.sampler,
            clip_skip=overrides.CLIP_stop_at_last_layers or clip_skip,
            subseed=self.subseed,
            subseed_strength=self.subseed_strength,
            hires=self.hires_fix(),
        )


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with its infotext")
    parameters: dict[str, Any] = Field(description="the request as received")
    info: str = Field(description="JSON: seeds, infotexts, prompts, model")


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = Field(0, description="jobs running or waiting")
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 of the running job")
    eta_relative: float = Field(description="seconds left, estimated")
    state: ProgressState
    current_image: str | None = Field(
        None, description="the latest live preview, base64 PNG (null before the first)"
    )
    textinfo: str | None = None

    @classmethod
    def of(cls, job: JobStatus) -> ProgressResponse:
        """The queue's snapshot as A1111 reports progress."""
        state = ProgressState(
            interrupted=job.interrupted,
            job=job.job,
            job_count=job.job_count,
            job_timestamp=job.job_timestamp,
            sampling_step=job.step,
            sampling_steps=job.total,
        )
        text = f"{job.job}: step {job.step}/{job.total}" if job.job else None
        image = None
        if job.current_image is not None:
            buffer = io.BytesIO()
            job.current_image.save(buffer, format="PNG")
            image = base64.b64encode(buffer.getvalue()).decode("ascii")
        return cls(
            progress=job.progress,
            eta_relative=job.eta,
            state=state,
            current_image=image,
            textinfo=text,
        )


class PNGInfoRequest(BaseModel):
    image: str = Field(description="base64 image, with or without a data: URL prefix")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="the parameters text")
    items: dict[str, Any] = Field(description="the image's other text chunks")
    parameters: dict[str, Any] = Field(description="the parameters as A1111 parses them")
