"""The prompt's network tags -> the (network, strengths) set the patcher applies: names looked up
in the catalog, files loaded (DyLoRA `dyn` honoured), repeated names combined."""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace

from webui.networks.apply import Strengths
from webui.networks.format import Network, NetworkFileError, load_network
from webui.networks.library import NetworkCatalog, UnknownNetworkError
from webui.prompt import NetworkTag, is_constant


@dataclass(frozen=True)
class ChosenNetwork:
    """A network a prompt asked for, under the name its tag used."""

    name: str
    network: Network
    strengths: Strengths


def strengths_of(tag: NetworkTag) -> Strengths:
    """A tag's resolved strengths as the patcher takes them."""
    return Strengths(
        te=tag.te1,
        te1=tag.te1,
        te2=tag.te2,
        unet=tag.unet,
        in_blocks=tag.in_blocks,
        mid=tag.mid,
        out=tag.out,
        blocks=tag.blocks.by_label() if tag.blocks else None,
    )


def _plain(strengths: Strengths) -> bool:
    return strengths.blocks is None and all(
        is_constant(getattr(strengths, f.name)) for f in fields(strengths) if f.name != "blocks"
    )


def _added(a: Strengths, b: Strengths) -> Strengths:
    values = {}
    for f in fields(a):
        if f.name == "blocks":
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        values[f.name] = None if x is None and y is None else (x or 0.0) + (y or 0.0)
    return replace(a, **values)


def choose_networks(
    tags: Sequence[NetworkTag], catalog: NetworkCatalog, warnings: list[str]
) -> list[ChosenNetwork]:
    """Resolve and load every tag's network. Unknown or unreadable files become warnings. The
    same name twice gives one warning and the strengths add: summed into one entry when both
    are plain numbers, else applied as two entries (the patcher sums their deltas)."""
    if any(_unknown(catalog, tag.name) for tag in tags):
        catalog.refresh()  # a file may have been added since the last scan
    chosen: list[ChosenNetwork] = []
    seen: dict[str, int] = {}
    for tag in tags:
        strengths = strengths_of(tag)
        key = tag.name.lower()
        if key in seen:
            warnings.append(f"{tag.text}: {tag.name} appears more than once; strengths are added")
            first = chosen[seen[key]]
            if _plain(first.strengths) and _plain(strengths) and tag.dyn is None:
                chosen[seen[key]] = replace(first, strengths=_added(first.strengths, strengths))
                continue
        try:
            network = load_network(catalog.resolve(tag.name).path, dyn=tag.dyn)
        except UnknownNetworkError as exc:
            warnings.append(str(exc) + did_you_mean(tag.name, _names(catalog)))
            continue
        except NetworkFileError as exc:
            warnings.append(str(exc))
            continue
        seen.setdefault(key, len(chosen))
        chosen.append(ChosenNetwork(tag.name, network, strengths))
    return chosen


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """` (did you mean "a" or "b"?)` for the closest catalog names to a misspelled one, compared
    without case; "" when none is close."""
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), by_lower, n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f'"{by_lower[c]}"' for c in close) + "?)"


def _names(catalog: NetworkCatalog) -> list[str]:
    """One name per file, the shortest a tag may use (its stem unless two files share it), and
    the aliases."""
    stems = Counter(f.stem.lower() for f in catalog.files)
    names = [f.stem if stems[f.stem.lower()] == 1 else f.name for f in catalog.files]
    names += [alias for f in catalog.files if (alias := catalog.alias(f))]
    return list(dict.fromkeys(names))


def _unknown(catalog: NetworkCatalog, name: str) -> bool:
    try:
        catalog.resolve(name)
    except UnknownNetworkError:
        return True
    return False
