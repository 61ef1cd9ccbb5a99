"""LoRA-first web UI for Stable Diffusion."""
