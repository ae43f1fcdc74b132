"""Make bnbcli/data/planner_table.json from the installed transformers: `python scripts/make_planner_table.py`.

For each architecture below, transformers builds the model on the meta device from its config class's
defaults (with a few layers), twice for tied and untied embeddings; the table keeps what its bitsandbytes
quantizer decides from (bnbcli/planning/table.py). Each entry is then checked: the table planner must give
exactly transformers' own plan (hf_transformers.plan_modules) for that model's checkpoint under several
schemes, or the architecture is left out with the reason printed. Run it again with another transformers
release to extend `checked_with` (`--check-only` checks the existing table against this one).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import re  # noqa: E402

from bnbcli.planning import hf_transformers, table  # noqa: E402
from bnbcli.planning.common import PlannerResult  # noqa: E402
from bnbcli.scheme import QuantScheme  # noqa: E402

OUT = REPO / "bnbcli" / "data" / "planner_table.json"
LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # "model.layers.12.mlp" → "model.layers.#.mlp"
# Left out because the table cannot describe them: ModernBertModel (layer 0 has no attention norm),
# T5ForConditionalGeneration (the decoder's layer count is a second key). The real planner serves them.
ARCHITECTURES = (
    # decoder-only language models
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "PhiForCausalLM",
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "GPTJForCausalLM",
    "GPTBigCodeForCausalLM",
    "OPTForCausalLM",
    "FalconForCausalLM",
    "BloomForCausalLM",
    "StableLmForCausalLM",
    "Starcoder2ForCausalLM",
    "OlmoForCausalLM",
    "Olmo2ForCausalLM",
    "GraniteForCausalLM",
    "CohereForCausalLM",
    "SmolLM3ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    # encoders
    "BertModel",
    "BertForMaskedLM",
    "RobertaModel",
    "XLMRobertaModel",
    "MPNetModel",
    "DistilBertModel",
    "T5EncoderModel",  # the text encoder of Flux and SD3 pipelines
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
)
LAYERS = (3, 5)  # two builds: a count that follows num_hidden_layers is counted by it
SCHEMES = (
    QuantScheme(method="nf4"),
    QuantScheme(method="int8"),
    QuantScheme(method="nf4", skip=("down_proj", "fc2", "c_proj", "layers.1", "dense")),
)


class Unsupported(Exception):
    pass


def build(cls: type, config: Any) -> nn.Module:
    with hf_transformers.quiet(), torch.device("meta"):
        return cls._from_config(config)  # type: ignore[attr-defined]


def config_for(cls: type, layers: int, tied: bool) -> Any:
    config = cls.config_class()  # type: ignore[attr-defined]
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):  # one entry per layer, checked on build
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    config.tie_word_embeddings = tied
    return config


def pattern(name: str, generalize: int) -> str:
    """The name with its first ``generalize`` numeric parts (layer numbers) as `#`."""
    return LAYER_INDEX.sub("#", name, count=generalize) if generalize else name  # re's count=0 means all


def role(module: nn.Module) -> str | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return "conv1d"
    if type(module) is nn.Linear:
        return "linear"
    return "linear-subclass" if isinstance(module, nn.Linear) else None


def index_sets(names: Iterable[str]) -> dict[str, set[int]]:
    """For each numbered position (the name up to it, every number before it as `#`), the numbers seen."""
    seen: dict[str, set[int]] = {}
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                seen.setdefault(table.count_key(".".join(parts[:i]) + "."), set()).add(int(part))
    return seen


def expansion(pat: str, counts: dict[str, set[int]]) -> set[str]:
    if "#" not in pat:
        return {pat}
    head, _, tail = pat.partition("#")
    return {n for i in sorted(counts.get(table.count_key(head), ())) for n in expansion(f"{head}{i}{tail}", counts)}


def generalized(named: dict[str, Any], counts: dict[str, set[int]]) -> dict[str, Any]:
    """{pattern: kind}: each name under the most general pattern whose every instance exists with the
    same kind (all layer numbers as `#`, else the first only: T5's layer.0 and layer.1 differ; else the
    name itself: T5's relative_attention_bias is in block 0 alone)."""
    order = {name: i for i, name in enumerate(named)}
    remaining = dict(named)
    found: dict[str, tuple[int, Any]] = {}
    for level in (99, 1, 0):
        groups: dict[str, list[str]] = {}
        for name in remaining:
            groups.setdefault(pattern(name, level), []).append(name)
        for pat, members in groups.items():
            kinds = {json.dumps(named[m]) for m in members}
            if len(kinds) == 1 and expansion(pat, counts) == set(members):
                found[pat] = (min(order[m] for m in members), named[members[0]])
                for m in members:
                    del remaining[m]
    return {pat: kind for pat, (_, kind) in sorted(found.items(), key=lambda item: item[1][0])}


def structure(model: nn.Module) -> tuple[dict[str, Any], list[str], dict[str, set[int]]]:
    """(modules {pattern: [class, role]}, state_dict key patterns, the numbers seen at each position)."""
    modules = {name: [type(m).__name__, role(m)] for name, m in model.named_modules()}
    state = list(model.state_dict())
    counts = index_sets([*modules, *state])
    return generalized(modules, counts), list(generalized(dict.fromkeys(state), counts)), counts


def numbered_positions(pat: str) -> set[str]:
    """The count keys of a pattern's `#`s ("a.#.b.#.c" → {"a.#", "a.#.b.#"})."""
    parts = pat.split("#")
    return {table.count_key("#".join(parts[:i])) for i in range(1, len(parts))}


def count_keys(
    counts: dict[int, dict[str, set[int]]], used: set[str], config: dict[str, Any], layers_key: str
) -> dict[str, str | int]:
    """Which config.json key counts each `#` the patterns use (its numbers are 0 .. count-1): the layer
    count's key when it follows the layers, else the one key of that value, else the count itself when no
    key has it (fixed by the architecture: T5's attention and feed-forward in each block)."""
    keys: dict[str, str | int] = {}
    for prefix in sorted(used):
        sizes = {layers: len(seen.get(prefix, ())) for layers, seen in counts.items()}
        for seen in counts.values():
            if seen.get(prefix, set()) != set(range(len(seen.get(prefix, ())))):
                raise Unsupported(f"{prefix} numbers {sorted(seen.get(prefix, ()))}, not 0..n-1")
        candidates = [k for k, v in config.items() if type(v) is int and v == sizes[LAYERS[0]]]
        if all(size == layers for layers, size in sizes.items()):
            keys[prefix] = layers_key
        elif len(set(sizes.values())) == 1 and len(candidates) == 1:
            keys[prefix] = candidates[0]
        elif len(set(sizes.values())) == 1 and not candidates:
            keys[prefix] = sizes[LAYERS[0]]
        else:
            raise Unsupported(f"no single config.json key counts {prefix} ({sizes}: {candidates})")
    return keys


FACTORS = (2, 3, 4)  # constant factors a dimension may have (GPT-2's c_attn is 3 * n_embd)


def dims_of(cls: type, model: nn.Module, state: list[str]) -> dict[str, list[Any]]:
    """Each state_dict pattern's shape as config.json expressions: a dimension is [key], [key, key] or
    [key, factor] (a product) when exactly one such expression follows every change of an int key
    (each built doubled, alone); else null, and the planner does not check that dimension."""
    base = config_for(cls, LAYERS[0], True).to_dict()
    keys = [k for k, v in base.items() if type(v) is int and v > 1]
    doubled: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in keys:
        config = config_for(cls, LAYERS[0], True)
        setattr(config, key, base[key] * 2)
        try:
            doubled[key] = {n: tuple(t.shape) for n, t in build(cls, config).state_dict().items()}
        except Exception:  # the config class refuses the change: that key cannot be checked
            continue
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    dims: dict[str, list[Any]] = {}
    for pat in state:
        name = pat.replace("#", "0")
        dims[pat] = [_dimension(name, d, v, base, doubled) for d, v in enumerate(shapes[name])]
    return dims


def _dimension(name: str, d: int, value: int, base: dict[str, Any], doubled: dict[str, Any]) -> list[Any] | None:
    values = {k: base[k] for k in doubled} | {f: f for f in FACTORS}
    candidates: list[tuple[Any, ...]] = [(k,) for k in doubled if base[k] == value]
    candidates += [
        (a, b)
        for i, a in enumerate(values)
        for b in list(values)[i:]
        if not (isinstance(a, int) and isinstance(b, int)) and values[a] * values[b] == value
    ]

    def follows(expression: tuple[Any, ...]) -> bool:
        for key, shapes in doubled.items():
            shape = shapes.get(name)
            if shape is None or len(shape) <= d or shape[d] != value * 2 ** expression.count(key):
                return False
        return True

    verified = [list(e) for e in candidates if follows(e)]
    return verified[0] if len(verified) == 1 else None


def tie_entry(model: nn.Module) -> dict[str, Any]:
    """The default skips that depend on tied embeddings. The last parameter, when in numbered layers, is
    in the last of each (the planner puts count - 1 for each `#`)."""
    tied = {k: v for k, v in (getattr(model, "all_tied_weights_keys", None) or {}).items()}
    if any(LAYER_INDEX.search(k) for pair in tied.items() for k in pair):
        raise Unsupported("tied weights inside numbered layers")
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output = [n for n, m in model.named_modules() if out is not None and m is out]
    if any(LAYER_INDEX.search(n) for n in output):
        raise Unsupported("the output embedding is inside numbered layers")
    params = list(model.named_parameters())
    last = pattern(params[-1][0], 99) if params else None
    return {"tied": dict(sorted(tied.items())), "output_embedding": output, "last_param": last}


def entry(arch: str) -> dict[str, Any]:
    import transformers

    cls = getattr(transformers, arch)
    defaults = cls.config_class().to_dict()  # type: ignore[attr-defined]
    probe = config_for(cls, LAYERS[0], True)
    layers_key = getattr(probe, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    models = {n: build(cls, config_for(cls, n, True)) for n in LAYERS}
    untied = build(cls, config_for(cls, LAYERS[0], False))
    quantizer = hf_transformers._bnb_quantizer(SCHEMES[0])
    if hasattr(quantizer, "_convert_model_for_quantization"):
        before = structure(untied)[0]
        quantizer._convert_model_for_quantization(untied)
        if structure(untied)[0] != before:
            raise Unsupported("transformers' quantizer swaps modules before quantizing")
    found = {n: structure(m) for n, m in models.items()}
    modules, state, _ = found[LAYERS[0]]
    for other in (*found.values(), structure(untied)):
        if other[:2] != (modules, state):
            raise Unsupported("the structure differs with the layer count or the tied embeddings")
    tied, plain = tie_entry(models[LAYERS[0]]), tie_entry(untied)
    lasts = [p for p in (tied["last_param"], plain["last_param"]) if p]
    used = {key for p in (*modules, *state, *lasts) for key in numbered_positions(p)}
    counts = count_keys({n: f[2] for n, f in found.items()}, used, probe.to_dict(), layers_key)
    keep = getattr(untied, "_keep_in_fp32_modules", None) or []
    dims = dims_of(cls, models[LAYERS[0]], state)
    return {
        "model_type": probe.model_type,
        "counts": counts,
        "defaults": {k: defaults[k] for k in (*counts.values(), "tie_word_embeddings") if k in defaults},
        "keep_fp32": sorted(keep),
        "tied": tied,
        "untied": plain,
        "modules": modules,
        "state": state,
        "dims": dims,
    }


def compare(arch: str, data: dict[str, Any]) -> None:
    """The table planner against transformers' own on the table's models: the same plan, or Unsupported."""
    import transformers

    cls = getattr(transformers, arch)
    for tied in (True, False):
        config = config_for(cls, LAYERS[1], tied).to_dict() | {"architectures": [arch]}
        model = build(cls, config_for(cls, LAYERS[1], tied))
        tied_keys = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
        tensors = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if k not in tied_keys}
        for scheme in SCHEMES:
            theirs = hf_transformers.plan_modules(config, tensors, scheme)
            ours = table.plan_modules(config, tensors, scheme, data)
            difference = differences(ours, theirs)
            if difference:
                raise Unsupported(f"tied={tied} {scheme.method} skip={scheme.skip}: {difference}")


def differences(ours: PlannerResult, theirs: PlannerResult) -> str | None:
    """What differs between two planners' answers, in everything that decides the output."""
    if set(ours.verdicts) != set(theirs.verdicts):
        return f"modules {sorted(set(ours.verdicts) ^ set(theirs.verdicts))[:3]}"
    for name, v in theirs.verdicts.items():
        o = ours.verdicts[name]
        if (o.quantize, o.reason, o.transpose) != (v.quantize, v.reason, v.transpose):
            return f"{name}: ours {(o.quantize, o.reason)} theirs {(v.quantize, v.reason)}"
    if ours.skip_modules != theirs.skip_modules:
        return f"skip list {ours.skip_modules} != {theirs.skip_modules}"
    if ours.params != theirs.params or ours.converted != theirs.converted:
        return "checkpoint key mapping"
    kinds = {k: v for k, v in theirs.kinds.items() if k in ours.kinds}
    if kinds != ours.kinds:
        return "module classes"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-only", action="store_true", help="check the existing table; write nothing")
    args = parser.parse_args()
    import transformers

    warnings.simplefilter("ignore")
    version = transformers.__version__
    if args.check_only:
        data = json.loads(OUT.read_text())
        failed = 0
        for arch in data["architectures"]:
            try:
                compare(arch, data)
            except Exception as err:
                failed += 1
                print(f"{arch}: {type(err).__name__}: {err}")
        print(f"{len(data['architectures']) - failed}/{len(data['architectures'])} agree with transformers {version}")
        return 1 if failed else 0
    data: dict[str, Any] = {"checked_with": [version], "architectures": {}}
    for arch in ARCHITECTURES:
        try:
            data["architectures"][arch] = entry(arch)
            compare(arch, data)
            print(f"{arch}: ok")
        except Exception as err:
            data["architectures"].pop(arch, None)
            print(f"{arch}: left out ({type(err).__name__}: {err})")
    if OUT.is_file():  # keep the other versions it was checked with, when this one agrees on every entry
        old = json.loads(OUT.read_text())
        if old["architectures"] == data["architectures"]:
            data["checked_with"] = sorted({*old["checked_with"], version}, key=table._minor)
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{len(data['architectures'])} architectures -> {OUT.relative_to(REPO)} (transformers {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
