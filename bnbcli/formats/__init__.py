"""The quantization formats, one module per family: pure torch block math, the CPU reference."""
