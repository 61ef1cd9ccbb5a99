"""HTML for the Networks tab: the card grid and the details panel. Pure: values in, text out."""

from __future__ import annotations

import datetime as dt
import hashlib
import html
from collections.abc import Sequence
from dataclasses import dataclass

from webui.arch import Arch

TAG_ROWS = 40  # rows of the tag-frequency table; the rest are summarised in one line


@dataclass(frozen=True)
class Card:
    """What one card shows; built from a catalog entry by the tab."""

    name: str  # path below loras/ without extension: what the tag uses
    title: str  # the file stem: the name its tag uses
    folder: str
    base: Arch | None
    trigger_words: tuple[str, ...] = ()
    preview_url: str | None = None
    error: str | None = None
    compatible: bool = True
    in_prompt: bool = False
    selected: bool = False
    size: int = 0
    mtime: float = 0.0
    subtitle: str | None = None  # the alias (ss_output_name) when it differs from the title
    strength: float | None = None  # a strength control with this value (None: no control)
    reason: str | None = None  # why it is dimmed, when not the base mismatch
    family: str | None = None  # the family it was made for, also one this app does not run


def initials(title: str) -> str:
    """Up to two letters for the placeholder: the first letters of the first two words."""
    words = [w for w in title.replace("_", " ").replace("-", " ").replace("/", " ").split() if w]
    if not words:
        return "?"
    if len(words) == 1:
        return words[0][:2].upper()
    return (words[0][0] + words[1][0]).upper()


def hue(name: str) -> int:
    """A stable hue (0..359) per name, so a placeholder keeps its colour between sessions."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:6], 16) % 360


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _attr(value: str) -> str:
    return html.escape(value, quote=True)


def _thumb(card: Card) -> str:
    if card.preview_url:
        return f"<img class='lw-card-img' loading='lazy' alt='' src='{_attr(card.preview_url)}'>"
    h = hue(card.name)
    style = f"background: linear-gradient(135deg, hsl({h} 55% 42%), hsl({(h + 40) % 360} 60% 28%));"
    return f"<div class='lw-card-ph' style='{style}'><span>{html.escape(initials(card.title))}</span></div>"


def _badges(card: Card) -> str:
    parts = []
    if card.base is not None:
        parts.append(
            f"<span class='lw-badge lw-base-{card.base.value.lower()}'>{card.base.label}</span>"
        )
    elif card.family:
        title = f" title='{_attr(card.reason)}'" if card.reason else ""
        parts.append(
            f"<span class='lw-badge lw-base-other'{title}>{html.escape(card.family)}</span>"
        )
    if card.error:
        parts.append(
            f"<span class='lw-badge lw-badge-error' title='{_attr(card.error)}'>unreadable</span>"
        )
    if card.in_prompt:
        parts.append("<span class='lw-badge lw-badge-on'>in prompt</span>")
    return "".join(parts)


def render_card(card: Card) -> str:
    classes = ["lw-card"]
    if not card.compatible:
        classes.append("lw-incompatible")
    if card.error:
        classes.append("lw-error")
    if card.in_prompt:
        classes.append("lw-in-prompt")
    if card.selected:
        classes.append("lw-selected")
    chips = "".join(
        f"<button class='lw-chip' type='button' data-word='{_attr(word)}' "
        f"title='Add “{_attr(word)}” to the prompt'>{html.escape(word)}</button>"
        for word in card.trigger_words[:6]
    )
    note = ""
    if card.reason:
        note = f"<div class='lw-card-note'>{html.escape(card.reason)}</div>"
    elif not card.compatible and card.base is not None:
        note = f"<div class='lw-card-note'>made for {card.base.label}: not for this model</div>"
    if card.error:
        note = f"<div class='lw-card-note lw-card-note-error'>{html.escape(card.error)}</div>"
    folder = (
        f"<span class='lw-card-folder'>{html.escape(card.folder)}/</span>" if card.folder else ""
    )
    subtitle = (
        f"<div class='lw-card-subtitle' title='Alias (ss_output_name)'>{html.escape(card.subtitle)}</div>"
        if card.subtitle
        else ""
    )
    strength = ""
    if card.strength is not None:
        strength = (
            f"<label class='lw-strength' title='Strength of the tag a click inserts'>strength "
            f"<input type='number' data-strength='1' step='0.05' min='-5' max='5' "
            f"value='{card.strength:g}'></label>"
        )
    tooltip = card.reason or f"Click: add or remove &lt;lora:{_attr(card.name)}&gt;"
    return (
        f"<div class='{' '.join(classes)}' data-lora='{_attr(card.name)}' role='button' tabindex='0' "
        f"title='{_attr(tooltip) if card.reason else tooltip}'>"
        f"<div class='lw-card-thumb'>{_thumb(card)}<div class='lw-card-badges'>{_badges(card)}</div>"
        f"<button class='lw-card-info' type='button' data-info='1' title='Details'>i</button></div>"
        f"<div class='lw-card-body'><div class='lw-card-title'>{folder}{html.escape(card.title)}</div>"
        f"{subtitle}{note}{strength}<div class='lw-chips'>{chips}</div></div></div>"
    )


def render_grid(cards: Sequence[Card], hidden: int = 0, folder_exists: bool = True) -> str:
    """The grid of cards, with a one-line summary; a friendly note when it is empty."""
    if not cards:
        if not folder_exists:
            message = "The LoRA folder does not exist yet. Create it, add files and press Refresh."
        elif hidden:
            message = f"No LoRA matches. {hidden} hidden by the search or filters."
        else:
            message = (
                "No LoRA files yet. Put .safetensors files in the LoRA folder and press Refresh."
            )
        return f"<div class='lw-grid-empty'>{html.escape(message)}</div>"
    summary = f"{len(cards)} shown" + (f" · {hidden} hidden by filters" if hidden else "")
    body = "".join(render_card(card) for card in cards)
    return f"<div class='lw-grid-summary'>{summary}</div><div class='lw-grid'>{body}</div>"


@dataclass(frozen=True)
class EmbeddingCard:
    """One textual-inversion embedding of `embeddings/`: a click writes its name in the prompt."""

    name: str  # what the prompt writes
    vectors: int
    encoders: tuple[str, ...]  # A1111's names: ("clip",) or ("clip_l", "clip_g")
    error: str | None = None
    compatible: bool = True  # its widths match the loaded model's text encoders


def encoders_label(encoders: Sequence[str]) -> str:
    """ "CLIP" for one encoder, "CLIP-L+G" for SDXL's pair."""
    if tuple(encoders) == ("clip",):
        return "CLIP"
    return "CLIP-" + "+".join(e.removeprefix("clip_").upper() for e in encoders)


def render_embedding_card(card: EmbeddingCard) -> str:
    classes = ["lw-card", "lw-embedding"]
    if not card.compatible:
        classes.append("lw-incompatible")
    if card.error:
        classes.append("lw-error")
        note = f"<div class='lw-card-note lw-card-note-error'>{html.escape(card.error)}</div>"
    else:
        vectors = f"{card.vectors} vector" + ("s" if card.vectors != 1 else "")
        note = f"<div class='lw-card-note'>{vectors} · {encoders_label(card.encoders)}</div>"
    return (
        f"<div class='{' '.join(classes)}' data-embedding='{_attr(card.name)}' role='button' "
        f"tabindex='0' title='Click: add “{_attr(card.name)}” to the prompt'>"
        f"<div class='lw-card-thumb'><div class='lw-card-badges'>"
        f"<span class='lw-badge lw-badge-embedding'>embedding</span></div></div>"
        f"<div class='lw-card-body'><div class='lw-card-title'>{html.escape(card.name)}</div>"
        f"{note}</div></div>"
    )


def render_embedding_grid(cards: Sequence[EmbeddingCard], hidden: int = 0) -> str:
    """The embeddings section under the LoRA grid; nothing when there is none to show."""
    if not cards:
        return ""
    summary = f"Embeddings: {len(cards)} shown" + (
        f" · {hidden} not for this model" if hidden else ""
    )
    body = "".join(render_embedding_card(card) for card in cards)
    return f"<div class='lw-grid-summary'>{summary}</div><div class='lw-grid'>{body}</div>"


@dataclass(frozen=True)
class Details:
    """What the details panel shows for the selected entry."""

    name: str
    title: str
    rows: tuple[tuple[str, str], ...]  # (field, value) summary
    tag_frequency: tuple[tuple[str, int], ...] = ()
    description: str = ""
    error: str | None = None


def summary_rows(
    *,
    base: Arch | None,
    base_source: str,
    variants: Sequence[str],
    rank: int | None,
    alpha: float | None,
    size: int,
    mtime: float,
    resolution: str | None,
    epochs: int | None,
    images: int | None,
    steps: int | None,
    base_checkpoint: str | None,
    autov2: str | None,
) -> tuple[tuple[str, str], ...]:
    """The metadata summary as (field, value) rows, leaving out what is unknown."""
    rows: list[tuple[str, str]] = []
    if base is not None:
        rows.append(("Base", f"{base.label}" + (f" ({base_source})" if base_source else "")))
    if variants:
        rows.append(("Type", ", ".join(variants)))
    if rank is not None:
        rows.append(("Rank / alpha", f"{rank} / {alpha:g}" if alpha is not None else str(rank)))
    if base_checkpoint:
        rows.append(("Trained on", base_checkpoint))
    if resolution:
        rows.append(("Resolution", resolution))
    training = [
        f"{value} {label}"
        for value, label in ((epochs, "epochs"), (images, "images"), (steps, "steps"))
        if value
    ]
    if training:
        rows.append(("Training", " · ".join(training)))
    rows.append(("Size", human_size(size)))
    if mtime:
        rows.append(("Modified", dt.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")))
    if autov2:
        rows.append(("AutoV2", autov2))
    return tuple(rows)


def render_details(details: Details | None) -> str:
    """The details panel: summary table, then the training tags with bars."""
    if details is None:
        return (
            "<div class='lw-details-empty'>Click a card's <b>i</b> (or a card) to see its "
            "details here.</div>"
        )
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in details.rows
    )
    error = f"<div class='lw-warnings'>{html.escape(details.error)}</div>" if details.error else ""
    description = (
        f"<p class='lw-details-desc'>{html.escape(details.description)}</p>"
        if details.description
        else ""
    )
    tags = ""
    if details.tag_frequency:
        top = details.tag_frequency[0][1] or 1
        body = "".join(
            f"<tr><td><button class='lw-chip lw-chip-tag' type='button' data-word='{_attr(tag)}'>"
            f"{html.escape(tag)}</button></td><td class='lw-tag-count'>{count}</td>"
            f"<td class='lw-tag-bar'><span style='width:{max(2, round(100 * count / top))}%'></span></td></tr>"
            for tag, count in details.tag_frequency[:TAG_ROWS]
        )
        more = len(details.tag_frequency) - TAG_ROWS
        extra = f"<div class='lw-tag-more'>and {more} more tags</div>" if more > 0 else ""
        tags = (
            "<h4>Training tags</h4><table class='lw-tag-table'><thead><tr><th>Tag</th>"
            f"<th>Count</th><th></th></tr></thead><tbody>{body}</tbody></table>{extra}"
        )
    return (
        f"<div class='lw-details' data-lora='{_attr(details.name)}'>"
        f"<h3>{html.escape(details.title)}</h3><code class='lw-details-tag'>&lt;lora:{html.escape(details.name)}&gt;</code>"
        f"{error}{description}<table class='lw-summary'>{rows}</table>{tags}</div>"
    )
