"""Calling the txt2img tab's Gradio endpoint (`/on_generate`) by control label, as a page would:
controls not named keep the value they show on a new page. Shared by the server tests."""

from __future__ import annotations

from typing import Any

from gradio_client import Client


def generate_via_ui(client: Client, **by_label: Any) -> tuple[Any, ...]:
    """Run `/on_generate` with the controls named by label (`Prompt`, `Seed (-1 = random)`,
    ...) set and the others at their defaults; returns the endpoint's outputs."""
    api = client.view_api(return_format="dict", print_info=False)
    parameters = api["named_endpoints"]["/on_generate"]["parameters"]
    labels = {p["label"] for p in parameters}
    unknown = set(by_label) - labels
    assert not unknown, f"no such control: {sorted(unknown)}; the tab has {sorted(labels)}"
    values = [
        by_label[p["label"]] if p["label"] in by_label else p["parameter_default"]
        for p in parameters
    ]
    return client.predict(*values, api_name="/on_generate")
