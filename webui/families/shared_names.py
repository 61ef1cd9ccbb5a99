"""Key patterns several families share (which one is meant depends on the layer's width)."""

# Where a transformer's own blocks start in a flattened key, whatever the file format.
ROOT = (
    r"^(base_model_model_)?"
    r"(lora_unet_|lora_transformer_|transformer_|model_diffusion_model_|diffusion_model_|lycoris_)?"
)
# LLM text encoders (Qwen, Llama, Gemma, Mistral): CLIP's layers sit under `encoder_layers`
# and have no o_proj/gate/up projections. Only input sides that carry the hidden width.
LLM = r"(?<!encoder)(^|_)layers_\d+_(self_attn_[qkv]_proj|mlp_(gate|up)_proj)_"
# NextDiT (Lumina 2, Z-Image) blocks and refiners; input sides that carry the hidden width.
NEXT_DIT = (
    r"(^|_)(layers|noise_refiner|context_refiner)_\d+_"
    r"(attention_(qkv|to_[qkv])|attn_to_[qkv]|feed_forward_(w[13]|linear_1))_"
)
