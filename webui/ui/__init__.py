"""Gradio user interface."""

from webui.ui.blocks import build_ui

__all__ = ["build_ui"]
