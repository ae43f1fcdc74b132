"""Make bnbcli/data/planner_table.json from the installed transformers and diffusers:
`python scripts/make_planner_table.py` (or `--check-only [--record]` to check the table against the installed
releases, and add them to `checked_with` when every entry agrees).

For each model class below, the library builds the model on the meta device from its config's defaults with
a few layers (3 and 5; transformers' also with tied and untied embeddings); the table keeps what the
library's bitsandbytes quantizer decides from (bnbcli/plan/planners/table.py): every module (layer numbers as
`#`), its class and whether the quantizer replaces it, the state_dict keys and their shapes as config.json
expressions, which config.json key counts each `#`, and transformers' default skips. Each entry is then
checked: the table planner must give exactly the library's own plan (hf_transformers / hf_diffusers
plan_modules) for that model's checkpoint under several schemes, or the class is left out, with the reason.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bnbcli.plan.planners import hf_diffusers, hf_transformers, table  # noqa: E402
from bnbcli.plan.planners.common import PlannerResult  # noqa: E402
from bnbcli.plan.scheme import QuantScheme  # noqa: E402

OUT = REPO / "bnbcli" / "data" / "planner_table.json"
LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # "model.layers.12.mlp" → "model.layers.#.mlp"
# Left out because the table cannot describe them: ModernBertModel (layer 0 has no attention norm),
# T5ForConditionalGeneration (the decoder's layer count is a second key), UNet2DConditionModel (its blocks
# come from lists in the config), SD3Transformer2DModel (its last block differs). The real planners serve them.
TRANSFORMERS_MODELS = (
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
DIFFUSERS_MODELS = ("FluxTransformer2DModel", "SanaTransformer2DModel")
LAYERS = (3, 5)  # two builds: a count that follows the layer count is counted by its key
SCHEMES = (
    QuantScheme(method="nf4"),
    QuantScheme(method="int8"),
    QuantScheme(method="nf4", skip=("down_proj", "fc2", "c_proj", "layers.1", "dense", "proj_out")),
)
FACTORS = (2, 3, 4)  # constant factors a dimension may have (GPT-2's c_attn is 3 * n_embd)


class Unsupported(Exception):
    pass


# --- the two libraries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Library:
    name: str
    models: tuple[str, ...]
    model_class: Callable[[str], type]
    defaults: Callable[[type], dict[str, Any]]  # the config class's defaults, as config.json has them
    layers_key: Callable[[type], str]
    config: Callable[[type, str, int, bool], dict[str, Any]]  # a config.json with N layers, tied or not
    build: Callable[[type, dict[str, Any]], nn.Module]
    plan: Callable[[dict[str, Any], Any, QuantScheme], PlannerResult]  # the library's own planner
    ties: bool  # transformers' default skips depend on tied embeddings


def _transformers_class(name: str) -> type:
    import transformers

    return getattr(transformers, name)


def _transformers_config(cls: type, name: str, layers: int, tied: bool) -> dict[str, Any]:
    config = cls.config_class()  # type: ignore[attr-defined]
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):  # one entry per layer, checked on build
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    config.tie_word_embeddings = tied
    return config.to_dict() | {"architectures": [name]}


def _transformers_build(cls: type, config: dict[str, Any]) -> nn.Module:
    return hf_transformers._build_meta_model(cls, config, 10**6)


def _diffusers_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def _diffusers_defaults(cls: type) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    return {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}


def _diffusers_config(cls: type, name: str, layers: int, tied: bool) -> dict[str, Any]:
    return _diffusers_defaults(cls) | {"_class_name": name, "num_layers": layers}


def _diffusers_build(cls: type, config: dict[str, Any]) -> nn.Module:
    with hf_transformers.quiet(), torch.device("meta"):
        return cls.from_config(dict(config))  # type: ignore[attr-defined]


TRANSFORMERS = Library(
    name="transformers",
    models=TRANSFORMERS_MODELS,
    model_class=_transformers_class,
    defaults=lambda cls: cls.config_class().to_dict(),  # type: ignore[attr-defined]
    layers_key=lambda cls: cls.config_class.attribute_map.get("num_hidden_layers", "num_hidden_layers"),  # type: ignore[attr-defined]
    config=_transformers_config,
    build=_transformers_build,
    plan=hf_transformers.plan_modules,
    ties=True,
)
DIFFUSERS = Library(
    name="diffusers",
    models=DIFFUSERS_MODELS,
    model_class=_diffusers_class,
    defaults=_diffusers_defaults,
    layers_key=lambda cls: "num_layers",
    config=_diffusers_config,
    build=_diffusers_build,
    plan=hf_diffusers.plan_modules,
    ties=False,
)


# --- what a model is made of --------------------------------------------------------------------------------


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


def structure(model: nn.Module) -> tuple[dict[str, Any], list[str], list[str], dict[str, set[int]]]:
    """(modules {pattern: [class, role]}, state_dict key patterns, buffers left out of the state_dict (older
    checkpoints hold some: BERT's position_ids), the numbers seen at each position)."""
    modules = {name: [type(m).__name__, role(m)] for name, m in model.named_modules()}
    state = list(model.state_dict())
    buffers = [name for name, _ in model.named_buffers() if name not in state]
    counts = index_sets([*modules, *state, *buffers])
    patterns = [list(generalized(dict.fromkeys(names), counts)) for names in (state, buffers)]
    return generalized(modules, counts), patterns[0], patterns[1], counts


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


def dims_of(lib: Library, cls: type, name: str, model: nn.Module, state: list[str]) -> dict[str, list[Any]]:
    """Each state_dict pattern's shape as config.json expressions: a dimension is [key], [key, key] or
    [key, factor] (a product) when exactly one such expression follows every change of an int key
    (each built doubled, alone); else null, and the planner does not check that dimension."""
    base = lib.config(cls, name, LAYERS[0], True)
    doubled: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in base.items():
        if type(value) is not int or value <= 1:
            continue
        try:
            built = lib.build(cls, base | {key: value * 2})
        except Exception:  # the config class refuses the change: that key cannot be checked
            continue
        doubled[key] = {n: tuple(t.shape) for n, t in built.state_dict().items()}
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    dims: dict[str, list[Any]] = {}
    for pat in state:
        instance = pat.replace("#", "0")
        dims[pat] = [_dimension(instance, d, v, base, doubled) for d, v in enumerate(shapes[instance])]
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
    """transformers' default skips that depend on tied embeddings. The last parameter, when in numbered
    layers, is in the last of each (the planner puts count - 1 for each `#`)."""
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


def keep_in_fp32(cls: type, model: nn.Module) -> list[str]:
    keep = getattr(model, "_keep_in_fp32_modules", None) or getattr(cls, "_keep_in_fp32_modules", None) or []
    return sorted([keep] if isinstance(keep, str) else keep)


def entry(lib: Library, name: str) -> dict[str, Any]:
    cls = lib.model_class(name)
    models = {n: lib.build(cls, lib.config(cls, name, n, True)) for n in LAYERS}
    untied = lib.build(cls, lib.config(cls, name, LAYERS[0], False))
    if lib.ties:
        quantizer = hf_transformers._bnb_quantizer(SCHEMES[0])
        if hasattr(quantizer, "_convert_model_for_quantization"):
            before = structure(untied)[0]
            quantizer._convert_model_for_quantization(untied)
            if structure(untied)[0] != before:
                raise Unsupported("transformers' quantizer swaps modules before quantizing")
    found = {n: structure(m) for n, m in models.items()}
    modules, state, buffers, _ = found[LAYERS[0]]
    for other in (*found.values(), structure(untied)):
        if other[:3] != (modules, state, buffers):
            raise Unsupported("the structure differs with the layer count or the tied embeddings")
    ties = {"tied": tie_entry(models[LAYERS[0]]), "untied": tie_entry(untied)} if lib.ties else {}
    lasts = [t["last_param"] for t in ties.values() if t["last_param"]]
    used = {key for p in (*modules, *state, *buffers, *lasts) for key in numbered_positions(p)}
    base = lib.config(cls, name, LAYERS[0], True)
    counts = count_keys({n: f[3] for n, f in found.items()}, used, base, lib.layers_key(cls))
    defaults = lib.defaults(cls)
    described = {
        "library": lib.name,
        "counts": counts,
        "defaults": {k: defaults[k] for k in (*counts.values(), "tie_word_embeddings") if k in defaults},
        "keep_fp32": keep_in_fp32(cls, untied),
        "modules": modules,
        "state": state,
        "buffers": buffers,
        "dims": dims_of(lib, cls, name, models[LAYERS[0]], state),
        **ties,
    }
    if lib.ties:
        described["model_type"] = base["model_type"]
    return described


# --- checking ------------------------------------------------------------------------------------------------


def compare(name: str, data: dict[str, Any]) -> None:
    """The table planner against the library's own on the table's models: the same plan, or Unsupported."""
    lib = TRANSFORMERS if data["models"][name]["library"] == "transformers" else DIFFUSERS
    cls = lib.model_class(name)
    for tied in (True, False) if lib.ties else (True,):
        config = lib.config(cls, name, LAYERS[1], tied)
        model = lib.build(cls, config)
        tied_keys = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
        tensors = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if k not in tied_keys}
        tensors |= {k: (tuple(v.shape), v.dtype) for k, v in model.named_buffers() if k not in tensors}
        for scheme in SCHEMES:
            theirs = lib.plan(config, tensors, scheme)
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


def installed() -> dict[str, str]:
    return {lib: version for lib in ("transformers", "diffusers") if (version := table.installed(lib))}


def check(record: bool) -> int:
    data = json.loads(OUT.read_text())
    failed = 0
    for name in data["models"]:
        try:
            compare(name, data)
        except Exception as err:
            failed += 1
            print(f"{name}: {type(err).__name__}: {err}")
    versions = installed()
    print(f"{len(data['models']) - failed}/{len(data['models'])} agree with {versions}")
    if record and not failed:
        for lib, version in versions.items():
            data["checked_with"][lib] = sorted({*data["checked_with"][lib], version}, key=table._minor)
        OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"checked_with: {data['checked_with']}")
    return 1 if failed else 0


def make() -> int:
    data: dict[str, Any] = {"checked_with": {lib: [v] for lib, v in installed().items()}, "models": {}}
    for lib in (TRANSFORMERS, DIFFUSERS):
        for name in lib.models:
            try:
                data["models"][name] = entry(lib, name)
                compare(name, data)
                print(f"{name}: ok")
            except Exception as err:
                data["models"].pop(name, None)
                print(f"{name}: left out ({type(err).__name__}: {err})")
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{len(data['models'])} models -> {OUT.relative_to(REPO)} ({installed()})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-only", action="store_true", help="check the existing table; write nothing")
    parser.add_argument("--record", action="store_true", help="with --check-only: add these releases if all agree")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    return check(args.record) if args.check_only else make()


if __name__ == "__main__":
    sys.exit(main())
