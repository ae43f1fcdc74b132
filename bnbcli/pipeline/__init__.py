"""The streaming execution of a plan: read a tensor, convert it (quantize or dequantize, on the CPU or a GPU),
write it; `bnb quantize` and `bnb dequantize` as library calls.

- ``executor``    the three overlapping stages (read → convert → write) that obey a plan
- ``convert``     one source tensor into the checkpoint entries its plan names
- ``quantize``    `bnb quantize` as a library call: open, plan, execute into a temporary folder, rename
- ``dequantize``  `bnb dequantize`, likewise
"""
