"""Checkpoints: safetensors headers and tensors (safetensors_file), sources to convert (source), output (writer)."""
