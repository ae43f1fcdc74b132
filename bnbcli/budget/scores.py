"""How much output error each candidate module adds when quantized: its score, the value of keeping it.

**Without calibration** (the default) the score comes from the weights alone, from what `bnb inspect`
measures of each weight under the scheme: the round trip through the bit-exact formats gives the error
ΔW = Ŵ − W. A module's output error is ΔW·x, so its expected size is ‖ΔW‖² times the energy of an input
dimension; with no input at hand every dimension is taken to carry the same energy, so the module's own
share is the relative error energy ‖ΔW‖²/‖W‖² (the noise-to-signal ratio of its output for such an input).
What the block does with that error is the path gain (``bnbcli.budget.paths``): an attention's value and
output projections, and an MLP's projections, act through their product, whose relative error is the
module's times the gain. ``weight_score`` is the product of the two. `bnb inspect`'s outlier figures are
reported beside it.

**With calibration** (``--calibrate``) the model runs on text and the score is the output error the module's
quantization is expected to add (``bnbcli.budget.calibrate``): the weight error applied to the module's real
inputs, seen through the rest of the model by the gradient (a KL divergence for a language model).

Every weight is read once, one at a time, as the model holds it ([out, in]; Conv1D transposed), in the dtype
the output keeps it in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from bnbcli.budget.paths import path_gains
from bnbcli.checkpoint.tensor_reads import read_tensor
from bnbcli.errors import InputError
from bnbcli.formats.metrics import roundtrip_error
from bnbcli.inspect.criteria import OutlierCriteria
from bnbcli.inspect.outliers import matrix_outliers
from bnbcli.inspect.roundtrip import restored
from bnbcli.plan.budget.candidates import Candidate
from bnbcli.plan.budget.choice import WeightFigures
from bnbcli.plan.scheme import QuantScheme

Progress = Callable[[int], None]


def _weight(c: Candidate) -> torch.Tensor:
    values = read_tensor(c.job.source)
    values = values.t() if c.job.decision.transpose else values
    return values.to(c.job.dtype.torch_dtype).contiguous()


def weight_figures(
    found: tuple[Candidate, ...],
    scheme: QuantScheme,
    backend: str,
    config: dict | None = None,
    progress: Progress = lambda n: None,
) -> dict[str, WeightFigures]:
    """Each candidate's round-trip error, outlier counts and path gain (``config``: the model's config.json,
    for the attention's head size)."""
    out = {}
    for c in found:
        weight = _weight(c)
        if not torch.isfinite(weight).all():
            raise InputError(
                f"{c.job.source.name} holds NaN or Inf values, which have no quantization error to score",
                hint=f"--skip {c.module!r} keeps it as it is",
            )
        error = roundtrip_error(weight, restored(weight, scheme, backend))
        outliers = matrix_outliers(weight, OutlierCriteria())
        out[c.module] = WeightFigures(error.rel_fro, outliers.count, outliers.large_values)
        progress(c.job.source.nbytes)
    by_module = {c.module: c for c in found}
    gains = path_gains(list(by_module), lambda module: _weight(by_module[module]), config)
    return {m: replace(f, path_gain=gains.get(m, 1.0)) for m, f in out.items()}


def calibrated_scores(
    found: tuple[Candidate, ...], scheme: QuantScheme, backend: str, model_dir: Path, texts: list[str] | None
) -> dict[str, float]:
    """module → the expected output error its quantization adds, over the texts (bnbcli.budget.calibrate)."""
    from bnbcli.budget.calibrate import output_errors

    dtypes = {c.module: c.job.dtype.torch_dtype for c in found}

    def restore(module: str, weight: torch.Tensor) -> torch.Tensor:
        w = weight.to(dtypes[module]).contiguous()
        return restored(w, scheme, backend).to(torch.float32)

    scores = output_errors(model_dir, list(dtypes), restore, texts)
    missing = [m for m in dtypes if m not in scores]
    if missing:
        raise InputError(
            f"--calibrate: {missing[0]} did not run on the texts ({len(missing)} modules did not)",
            hint="leave --calibrate out: the weights alone score every module",
        )
    return scores
