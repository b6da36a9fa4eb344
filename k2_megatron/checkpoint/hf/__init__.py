"""Hugging Face checkpoints (DeepSeek-V3 / Kimi K2 layout): safetensors reading and writing (``safetensors_io``),
the release's FP8 block quantisation (``fp8``) and the state-dict adapter to our megatron model (``adapter``)."""
