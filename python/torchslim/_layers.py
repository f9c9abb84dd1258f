"""What counts as a linear layer, how to read one as ``y = x @ W.T + b``, and which of a
model's linear layers a workflow function works on (:func:`select_layers`).

torchslim compresses ``nn.Linear`` and layers that compute the same function with another
weight layout: transformers' ``Conv1D`` (GPT-2 family; ``weight`` stored ``[in, out]``,
``y = x @ weight + bias``). transformers is never imported here: a Conv1D is recognised by
its class name, module and attributes, so torchslim works with or without it installed.

Layer selection
---------------
``magnitude_prune``, ``GradualPruner``, ``iterative_prune``, ``l1_penalty``,
``cluster_weights`` and ``sparsity_report`` all choose their layers through
:func:`select_layers`, so they agree on what a linear layer is and on these rules:

- ``include`` / ``exclude``: None, a module name, an fnmatch pattern (``"*lm_head"``,
  ``"encoder.*.attention.*"``), a list of names / patterns, or a callable
  ``(name, module) -> bool``. A name or pattern is matched against every name under which a
  module is registered. A name that is not a module of the model or a module that is not a
  linear layer raises ValueError, in ``exclude`` too (a typo there would silently compress
  the layer meant to be protected); so does an ``include`` pattern that matches no linear
  layer. An ``exclude`` pattern may match nothing, so that one list such as
  ``["*lm_head", "*classifier"]`` serves several architectures.
- ``nn.MultiheadAttention``'s ``out_proj`` is never selected (the attention reads its
  ``weight`` directly, so replacing the layer would be ignored); naming it raises.
- Tied weights (a Parameter held by several modules, e.g. GPT-2's ``lm_head.weight`` is
  ``transformer.wte.weight``): compressing one side would silently change the other. A tied
  layer is skipped with a warning naming the tie when selected implicitly
  (``include=None``), and raises ValueError when ``include`` selects it. Name it in
  ``exclude`` to silence the warning, or untie it first.
- Layers with no weights (``in_features == 0`` or ``out_features == 0``) have nothing to
  prune or cluster: they are left as they are, with a warning.
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Callable

import torch
from torch import nn

__all__ = ["is_conv1d", "is_linear_like", "linear_parts", "torch_pruned_parts", "select_layers", "tied_parameters"]

PURPOSES = ("prune", "cluster", "penalty", "report")
_VERBS = {"prune": "prune", "cluster": "cluster", "penalty": "penalise", "report": "report"}
_DONE = {"prune": "pruned", "cluster": "clustered", "penalty": "penalised", "report": "reported"}
_LIST_FIRST = 10  # error messages list this many layer names, then the count


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (``pytorch_utils.Conv1D``): weight ``[in, out]``."""
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "nf"))


def is_linear_like(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (or subclass) or a transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """``(weight [out, in], bias or None, in_features, out_features)`` of a linear-like layer,
    the weight as ``nn.Linear`` stores it (a transposed view for Conv1D; detach/clone as
    needed)."""
    if is_conv1d(module):
        w = module.weight.t()
        return w, module.bias, int(w.shape[1]), int(w.shape[0])
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, int(module.in_features), int(module.out_features)
    raise TypeError(f"expected an nn.Linear or a transformers Conv1D, got {type(module).__name__}")


def torch_pruned_parts(module: nn.Module, name: str = "weight") -> tuple[nn.Parameter, torch.Tensor] | None:
    """``(name_orig Parameter, name_mask buffer)`` when ``torch.nn.utils.prune`` parametrizes
    ``module.<name>`` (its forward pre-hook recomputes ``<name> = <name>_orig * <name>_mask``),
    else None. Both in the layer's own layout ([in, out] for a Conv1D)."""
    orig = module._parameters.get(name + "_orig")
    mask = module._buffers.get(name + "_mask")
    if orig is None or mask is None:
        return None
    return orig, mask


# --------------------------------------------------------------------------- selection


def _torchslim_kind(module: nn.Module) -> str | None:
    # Imported here: torchslim.nn may itself import this module.
    from torchslim.nn.codebook_linear import CodebookLinear
    from torchslim.nn.masked_sparse_linear import MaskedSparseLinear

    if isinstance(module, MaskedSparseLinear):
        return "masked"
    if isinstance(module, CodebookLinear):
        return "codebook"
    return None


def _accepts(module: nn.Module, purpose: str) -> bool:
    kind = _torchslim_kind(module)
    if kind == "codebook":
        return purpose == "report"  # already clustered: nothing to prune, cluster or penalise
    return kind == "masked" or is_linear_like(module)


def _is_any_linear(module: nn.Module) -> bool:
    return _torchslim_kind(module) is not None or is_linear_like(module)


def _weight_numel(module: nn.Module) -> int:
    if _torchslim_kind(module) is not None:
        return int(module.in_features) * int(module.out_features)
    _, _, in_f, out_f = linear_parts(module)
    return in_f * out_f


def _has_wildcard(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def tied_parameters(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``{id(parameter): [(qualified name, owning module), ...]}`` for every Parameter that
    two or more distinct module objects hold (tied weights); each module listed once, under
    its first name."""
    owners: dict[int, dict[int, tuple[str, nn.Module]]] = {}
    for mod_name, m in model.named_modules(remove_duplicate=False):
        for p_name, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), {}).setdefault(id(m), (f"{mod_name}.{p_name}" if mod_name else p_name, m))
    return {pid: list(mods.values()) for pid, mods in owners.items() if len(mods) > 1}


def _layer_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module._parameters.values() if p is not None]


def _describe_tie(module: nn.Module, ties: dict) -> str | None:
    """``"'transformer.wte.weight' (Embedding)"``-style description of what ``module``'s
    parameters are tied to, or None."""
    others = []
    for p in _layer_params(module):
        for qual, owner in ties.get(id(p), ()):
            if owner is not module:
                others.append(f"{qual!r} ({type(owner).__name__})")
    return ", ".join(dict.fromkeys(others)) or None


def _name_list(candidates) -> str:
    names = [repr(n) for n, _ in candidates]
    shown = ", ".join(names[:_LIST_FIRST])
    more = f", ... ({len(names)} in all)" if len(names) > _LIST_FIRST else f" ({len(names)} in all)"
    return shown + more if names else "none"


def _spec_list(spec, arg: str) -> list | Callable:
    if callable(spec) and not isinstance(spec, str):
        return spec
    if isinstance(spec, str):
        return [spec]
    try:
        items = list(spec)
    except TypeError:
        raise TypeError(f"{arg} must be None, a module name or fnmatch pattern, a list of them, or a callable "
                        f"(name, module) -> bool; got {type(spec).__name__}") from None
    for s in items:
        if not isinstance(s, str):
            raise TypeError(f"{arg}: module names / patterns must be str, got {type(s).__name__} {s!r}")
    return items


def _resolve(specs, arg: str, candidates, aliases, by_name, out_proj_ids, purpose) -> set[int]:
    """ids of the candidate modules the names / patterns ``specs`` select; ValueError for a
    spec that names nothing usable."""
    chosen: set[int] = set()
    cand_ids = {id(m) for _, m in candidates}
    for spec in specs:
        if spec in by_name:
            m = by_name[spec]
            if id(m) in out_proj_ids:
                if arg == "exclude":
                    continue  # never selected anyway
                raise ValueError(f"{arg} names {spec!r}, the output projection of an nn.MultiheadAttention, which "
                                 "reads its weight directly: replacing the layer would have no effect")
            if id(m) not in cand_ids:
                if arg == "exclude" and _is_any_linear(m):
                    continue  # e.g. a CodebookLinear under cluster_weights: left alone anyway
                if _torchslim_kind(m) == "codebook":
                    raise ValueError(f"{arg} names {spec!r}, which is already a CodebookLinear; only nn.Linear, "
                                     f"transformers Conv1D and MaskedSparseLinear layers can be {_DONE[purpose]}")
                raise ValueError(f"{arg} names {spec!r}, a {type(m).__name__}, not a linear layer (nn.Linear, "
                                 "transformers Conv1D or MaskedSparseLinear); the model's linear layers are "
                                 f"{_name_list(candidates)}")
            chosen.add(id(m))
            continue
        if not _has_wildcard(spec):
            raise ValueError(f"{arg}: the model has no module named {spec!r}; its linear layers are "
                             f"{_name_list(candidates)}")
        hits = {id(m) for _, m in candidates if any(fnmatch.fnmatchcase(a, spec) for a in aliases[id(m)])}
        if not hits and arg == "include":  # exclude patterns may be generic ("*lm_head" for any model)
            raise ValueError(f"{arg}: the pattern {spec!r} matches none of the model's linear layers, which are "
                             f"{_name_list(candidates)}")
        chosen |= hits
    return chosen


def select_layers(model: nn.Module, include=None, exclude=None, *, purpose: str = "prune",
                  stacklevel: int = 3) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model``'s linear layers a workflow function works on,
    in module order, each module once under its first name (``""`` for the model itself).

    ``purpose``: "prune" and "penalty" (nn.Linear, transformers Conv1D, MaskedSparseLinear),
    "cluster" (the same; CodebookLinear layers are left alone), "report" (also
    CodebookLinear; no tie or empty-layer handling, and no error for a model without linear
    layers). See the module docstring for ``include`` / ``exclude``, MultiheadAttention,
    tied weights and layers without weights.

    Raises ValueError for a model without linear layers (except "report"), for names /
    patterns that select nothing, for a selection that ends up empty, and for an explicitly
    included tied layer; TypeError for arguments of the wrong type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(map(repr, PURPOSES))}, got {purpose!r}")
    verb = _VERBS[purpose]
    aliases: dict[int, list[str]] = {}
    by_name: dict[str, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(name)
        by_name.setdefault(name, m)
    out_proj_ids = {id(m.out_proj) for m in model.modules()
                    if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Module)}
    candidates = [(n, m) for n, m in model.named_modules() if _accepts(m, purpose) and id(m) not in out_proj_ids]
    if purpose == "report":
        return candidates
    if not candidates:
        left_alone = " (CodebookLinear layers are left alone)" if purpose == "cluster" else ""
        raise ValueError(f"model: {type(model).__name__} has no nn.Linear, transformers Conv1D or MaskedSparseLinear "
                         f"layer to {verb}{left_alone}")

    selected = candidates
    if include is not None:
        specs = _spec_list(include, "include")
        if callable(specs):
            selected = [(n, m) for n, m in candidates if specs(n, m)]
            if not selected:
                raise ValueError(f"include: the callable selected none of the model's linear layers "
                                 f"({_name_list(candidates)})")
        else:
            if not specs:
                raise ValueError("include is empty: name at least one layer, or pass include=None for all")
            chosen = _resolve(specs, "include", candidates, aliases, by_name, out_proj_ids, purpose)
            selected = [(n, m) for n, m in candidates if id(m) in chosen]
    if exclude is not None:
        specs = _spec_list(exclude, "exclude")
        if callable(specs):
            selected = [(n, m) for n, m in selected if not specs(n, m)]
        else:
            dropped = _resolve(specs, "exclude", candidates, aliases, by_name, out_proj_ids, purpose)
            selected = [(n, m) for n, m in selected if id(m) not in dropped]
        if not selected:
            raise ValueError(f"exclude removed every selected layer: nothing left to {verb}")

    ties = tied_parameters(model)
    out = []
    for name, m in selected:
        tie = _describe_tie(m, ties)
        label = name or "(the model itself)"
        if tie is not None:
            if include is not None:
                raise ValueError(f"include selects layer {label!r}, whose weight is tied to {tie}: to {verb} one side "
                                 "of a tie would silently change the other. Untie it first (e.g. "
                                 "layer.weight = nn.Parameter(layer.weight.detach().clone())) or leave it out")
            warnings.warn(f"{verb}: layer {label!r} left unchanged: its weight is tied to {tie} (to {verb} one side "
                          "of a tie would silently change the other). Untie it first to include it, or name it in "
                          "exclude= to silence this warning", UserWarning, stacklevel=stacklevel)
            continue
        if purpose in ("prune", "cluster") and _weight_numel(m) == 0:
            warnings.warn(f"{verb}: layer {label!r} has no weights (in_features or out_features is 0); left unchanged",
                          UserWarning, stacklevel=stacklevel)
            continue
        out.append((name, m))
    return out
