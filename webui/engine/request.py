"""`GenerationRequest`: everything that decides the images, with its range checks; the same
for every model family (a family's recipe reads the fields it uses)."""

from __future__ import annotations

from dataclasses import dataclass

from webui.engine.hires import HiresFix
from webui.engine.request_error import RequestError as RequestError
from webui.engine.samplers import UnknownSamplerError, get_sampler
from webui.settings import LIMITS, LoraBackend, RequestLimits

MAX_SEED = 2**32 - 1
DEFAULT_DISTILLED_CFG = 3.5  # Forge's default for FLUX.1 [dev]


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides the images. `seed=-1` picks a random seed; `sampler=""` the
    model family's own default. On FLUX.1, `cfg_scale` above 1 is true classifier-free guidance
    with the negative prompt (1: off, the negative prompt unused) and `distilled_cfg_scale` is
    [dev]'s guidance input ([schnell] has none); SD models ignore `distilled_cfg_scale`."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = DEFAULT_DISTILLED_CFG
    width: int = 512
    height: int = 512
    seed: int = -1
    batch_size: int = 1
    batch_count: int = 1
    sampler: str = ""  # the family's default (SD: Euler a, FLUX.1: Euler)
    clip_skip: int = 1
    lora_backend: LoraBackend | None = None  # None: the Settings default
    # trigger words added (0 off, N the first N, -1 all); None: the server-wide setting
    auto_trigger_words: int | None = None
    # A1111's variation seed: each image's noise blended toward this seed's by the strength
    subseed: int = -1
    subseed_strength: float = 0.0
    hires: HiresFix | None = None  # A1111's hires fix (second pass); None: off

    @property
    def varies(self) -> bool:
        """Whether a variation seed changes the initial noise."""
        return self.subseed_strength != 0

    def validate(self, limits: RequestLimits = LIMITS) -> None:
        """Raise RequestError naming the first field that is out of range."""
        most = limits.max_prompt_chars
        checks = [
            ("prompt", len(self.prompt) <= most, f"is too long: at most {most} characters"),
            (
                "negative_prompt",
                len(self.negative_prompt) <= most,
                f"is too long: at most {most} characters",
            ),
            ("steps", 1 <= self.steps <= 150, "must be between 1 and 150"),
            # NaN fails every comparison; infinity is out of range
            ("cfg_scale", 0.0 <= self.cfg_scale <= 30.0, "must be between 0 and 30"),
            (
                "distilled_cfg_scale",
                0.0 <= self.distilled_cfg_scale <= 30.0,
                "must be between 0 and 30",
            ),
            (
                "width",
                self.width % 8 == 0 and 64 <= self.width <= 2048,
                "must be a multiple of 8 in 64..2048",
            ),
            (
                "height",
                self.height % 8 == 0 and 64 <= self.height <= 2048,
                "must be a multiple of 8 in 64..2048",
            ),
            ("seed", -1 <= self.seed <= MAX_SEED, f"must be -1 (random) or 0..{MAX_SEED}"),
            ("batch_size", 1 <= self.batch_size <= 8, "must be between 1 and 8"),
            ("batch_count", 1 <= self.batch_count <= 100, "must be between 1 and 100"),
            ("clip_skip", 1 <= self.clip_skip <= 12, "must be between 1 and 12"),
            ("subseed", -1 <= self.subseed <= MAX_SEED, f"must be -1 (random) or 0..{MAX_SEED}"),
            ("subseed_strength", 0.0 <= self.subseed_strength <= 1.0, "must be between 0 and 1"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise RequestError(f"{name} {message} (got {_shown(getattr(self, name))})")
        if self.hires is not None:
            self.hires.validate(self.width, self.height, limits)
        if not self.sampler:
            return
        try:
            get_sampler(self.sampler)
        except UnknownSamplerError as exc:
            raise RequestError(f"sampler: {exc}") from exc


def _shown(value: object) -> str:
    """A field's value for an error message; long text is cut to its length and start."""
    if isinstance(value, str) and len(value) > 40:
        return f"{len(value)} characters: {value[:20]!r}..."
    return repr(value)
