"""Planning an apply, pure: which model module each network module lands on, at what multiplier,
and the report of what matched. A dry run ("does it map?") is a plan with nothing written."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from webui.arch import Arch
from webui.networks.apply.apply_errors import NOT_A_NETWORK_FAULT, NetworkApplyError
from webui.networks.apply.blocks import BlockMap
from webui.networks.apply.fused import RowPiece
from webui.networks.apply.keys import Component, KeyMap, ModuleRef, Piece
from webui.networks.apply.reports import NetworkReport
from webui.networks.apply.strengths import Strengths
from webui.networks.format.base_detection import fits
from webui.networks.format.modules import NetworkModule
from webui.networks.format.network import Network

log = logging.getLogger(__name__)

# One contribution to a target module: which network, which of its modules, at what multiplier.
Contribution = tuple[Network, NetworkModule, float]


@dataclass
class Plan:
    """Per target module: the contributions wanted after this call."""

    targets: dict[ModuleRef, list[Contribution]] = field(default_factory=dict)

    def add(self, ref: ModuleRef, contribution: Contribution) -> None:
        self.targets.setdefault(ref, []).append(contribution)


# What decides whether a module must be rewritten: its (network, module key, multiplier) list.
# Networks compare by identity (a reloaded file is another network).
Signature = tuple[tuple[Network, str, float], ...]


def signature(contributions: Iterable[Contribution]) -> Signature:
    return tuple((net, module.key, multiplier) for net, module, multiplier in contributions)


def weight_of(module: nn.Module) -> Tensor | None:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def bias_of(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, Tensor) else None


def _piece_module(module: NetworkModule, piece: Piece) -> NetworkModule:
    if piece.rows is None:
        return module
    return RowPiece(key=module.key, inner=module, rows=piece.rows, fused_rows=piece.fused_rows)


def plan_network(
    network: Network,
    strengths: Strengths,
    keymap: KeyMap,
    arch: Arch | None,
    blocks: BlockMap,
    plan: Plan | None = None,
) -> NetworkReport:
    """How `network` maps onto the model behind `keymap` (matched, unmatched, shape mismatches,
    whether its base fits `arch`, strengths the model cannot take): pure, nothing is written.
    The contributions it would make are added to `plan` when one is given; none when its block
    vector is not one the model takes (as a tag whose vector cannot be read is skipped)."""
    compatible = fits(network.base, arch)  # never a family this app does not run
    vector_problem = blocks.vector_problem(strengths.blocks) if strengths.blocks else None
    notes = tuple(
        note
        for note in (
            vector_problem and f"{vector_problem}; not applied",
            blocks.unet_keys_problem(strengths.unet_block_keys),
        )
        if note
    )
    compatible_strengths = vector_problem is None
    matched: list[str] = []
    unmatched: list[str] = []
    mismatched: list[str] = []
    for prefix, module in network.modules.items():
        try:
            pieces = keymap.pieces(prefix)
            if not pieces:
                unmatched.append(prefix)
                continue
            # one file module may land on several modules (rows of a fused BFL weight)
            targets = [(p.ref, _piece_module(module, p)) for p in pieces]
            weights = [weight_of(ref.module) for ref, _ in targets]
            if any(
                w is None or not m.accepts(w.shape)
                for w, (_, m) in zip(weights, targets, strict=True)
            ):
                mismatched.append(prefix)
                continue
            matched.append(prefix)
            multipliers = [
                strengths.multiplier(
                    ref.component,
                    blocks.block(ref.path) if ref.component is Component.UNET else None,
                )
                for ref, _ in targets
            ]
        except NOT_A_NETWORK_FAULT:
            raise
        except Exception as error:
            raise NetworkApplyError(network, prefix, error) from error
        for (ref, target_module), multiplier in zip(targets, multipliers, strict=True):
            if plan is not None and compatible and compatible_strengths and multiplier != 0:
                plan.add(ref, (network, target_module, multiplier))
    for prefix in mismatched:
        log.warning("%s: %s does not fit its target weight; skipped", network.name, prefix)
    return NetworkReport(
        name=network.name,
        variants=tuple(v.value for v in network.variants),
        matched=tuple(matched),
        unmatched=tuple(unmatched),
        unsupported=tuple(network.unsupported),
        shape_mismatch=tuple(mismatched),
        base=network.base.arch,
        base_source=network.base.source,
        compatible=compatible,
        applied=compatible and compatible_strengths and bool(matched),
        notes=notes,
    )
