"""Everything decided before a byte is written: the scheme (settings), which tensor is quantized and why
(the planners), the model's dtype, and the output layouts with their exact sizes. Execution never
re-decides (bnbcli/pipeline/).

- ``scheme``, ``scheme_names``  the quantization settings and presets; the names the verbs compare
- ``decisions``                 per tensor: quantize or keep, and why; the quantization_config
- ``dtype``                     the dtype a model loads in (one rule for quantize, dequantize, footprint)
- ``planners/``                 the planner table, transformers, diffusers, name rules, and the plan cache
- ``quantize_layout``           where every output of `bnb quantize` goes: shards, entries, sizes
- ``dequantize_layout``         the same for `bnb dequantize`

Kept free of heavy imports here: ``scheme_names`` is read by the command line without torch.
"""
