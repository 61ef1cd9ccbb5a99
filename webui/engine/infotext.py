"""A1111's "parameters" text: the prompt, the negative prompt and one line of `Key: value` pairs.
Written into PNG text chunks and parsed back the way A1111 reads it."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PNG_TEXT_KEY = "parameters"
_NEGATIVE_PREFIX = "Negative prompt:"

# One `Key: value` pair; a value is either JSON-quoted (it may then hold commas) or runs to the
# next comma. Keys start with a word character and may hold spaces, dashes and slashes.
# A1111's pattern is the first alternative alone; findall then retried it at every character of
# a run of key characters with no colon after it (quadratic). The second alternative consumes
# such a run in one step (no position inside it could start a pair either), the empty one lets
# a whitespace run be skipped once; both leave the key group empty.
_PARAM = re.compile(r'\s*+(?:(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)|\w[\w \-/]*+|)')

# A1111's key and value for a zero-terminal-SNR schedule (its `sd_noise_schedule` option)
NOISE_SCHEDULE_KEY = "Noise Schedule"
ZERO_TERMINAL_SNR = "Zero Terminal SNR"
# A1111 has no key for the prediction type; ours, written only for v-prediction models
PREDICTION_KEY = "Prediction"
V_PREDICTION = "v-prediction"


def model_schedule_fields(v_prediction: bool, zero_snr: bool) -> dict[str, str]:
    """The parameters that say how a model was sampled, when it is not A1111's default."""
    fields = {PREDICTION_KEY: V_PREDICTION} if v_prediction else {}
    if zero_snr:
        fields[NOISE_SCHEDULE_KEY] = ZERO_TERMINAL_SNR
    return fields


@dataclass(frozen=True)
class Infotext:
    """Generation parameters as A1111 writes them. `params` keeps the written order."""

    prompt: str
    negative_prompt: str = ""
    params: Mapping[str, str] = field(default_factory=dict)

    def format(self) -> str:
        """The text A1111 would write for these parameters."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"{_NEGATIVE_PREFIX} {self.negative_prompt}")
        pairs = ", ".join(f"{key}: {quote(value)}" for key, value in self.params.items())
        if pairs:
            lines.append(pairs)
        return "\n".join(lines)


def quote(value: object) -> str:
    """A1111's quoting: values with a comma, colon, quote or newline become JSON strings."""
    text = str(value)
    if any(ch in text for ch in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(value: str) -> str:
    """Inverse of `quote`; values that are not valid JSON strings come back unchanged."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            return value
    return value


def _pairs(line: str) -> list[tuple[str, str]]:
    """The `Key: value` pairs of a line, in A1111's reading, in linear time."""
    return [(key, value) for key, value in _PARAM.findall(line) if key]


def _parse_params_line(pairs: list[tuple[str, str]]) -> dict[str, str]:
    return {key.strip(): unquote(value.strip()) for key, value in pairs}


def parse_infotext(text: str) -> Infotext:
    """Parse A1111 parameters text. The last line is the parameters line when it holds at least
    three `Key: value` pairs (A1111's rule); lines starting `Negative prompt:` begin the negative
    prompt, which runs to the parameters line."""
    lines = text.strip("\n").split("\n")
    params: dict[str, str] = {}
    pairs = _pairs(lines[-1]) if lines else []
    if len(pairs) >= 3:
        params = _parse_params_line(pairs)
        lines.pop()
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    return Infotext("\n".join(prompt_lines), "\n".join(negative_lines), params)


def png_info(infotext: Infotext) -> PngInfo:
    """A PNG text chunk holding the infotext under A1111's key."""
    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, infotext.format())
    return info


def save_png(image: Image.Image, path: Path, infotext: Infotext) -> None:
    """Write `image` as PNG with its parameters text chunk."""
    image.save(path, format="PNG", pnginfo=png_info(infotext))


class ImageTooLargeError(ValueError):
    """An image with more pixels than the server decodes; the message gives its size."""


def open_image(source: Path | BinaryIO, max_pixels: int) -> Image.Image:
    """Open an image, refusing one over `max_pixels` before its pixels are decoded (PIL reads
    the size from the header first). Raises ImageTooLargeError, or PIL's errors for a file
    that is not an image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError as exc:  # PIL's own, far higher limit
        raise ImageTooLargeError(f"image too large to read: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image too large to read: {width}x{height} is {width * height} pixels, "
            f"at most {max_pixels}"
        )
    image.load()  # text chunks written after the pixel data are read only here
    return image


def read_image_parameters(image: Image.Image) -> str | None:
    """The parameters text stored in an image (PNG text chunk, or JPEG/WebP EXIF user comment
    as A1111 writes it), or None."""
    text = image.info.get(PNG_TEXT_KEY)
    if isinstance(text, str):
        return text
    comment = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD -> UserComment
    if isinstance(comment, bytes):
        # EXIF UserComment starts with an 8-byte charset marker; A1111 writes UNICODE (UTF-16).
        body = comment[8:]
        encoding = "utf-16-be" if comment.startswith(b"UNICODE") else "utf-8"
        decoded = body.decode(encoding, errors="replace").strip("\x00")
        return decoded or None
    return None
