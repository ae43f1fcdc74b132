"""`bnb inspect`: what a checkpoint's tensors look like and what each bitsandbytes format would do to them.

Modules (kept free of heavy imports here, so each can be imported on its own):

* ``stats``      per-tensor statistics, streamed in float64 chunks
* ``outliers``   outlier input columns / output rows, isolated large values, recurrence across layers
* ``roundtrip``  the round-trip error of a tensor under each scheme (bit-exact formats, any backend)
* ``run``        the library call: open, plan, stream every tensor, build the report
* ``report``     the frozen report record and its JSON form
* ``gates``      CI thresholds over the report
* ``html``       the self-contained HTML page
* ``activations`` activation outliers through transformers (``--activations``)
"""
