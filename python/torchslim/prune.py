"""Pruning workflow: unstructured magnitude pruning (one-shot, gradual, iterative), L1
regularisation, structured neuron removal and sparsity reports.

Unstructured pruning turns ``nn.Linear`` layers into :class:`torchslim.nn.MaskedSparseLinear`
(the same ``weight`` and ``bias`` Parameter objects, plus a boolean ``mask`` buffer), so an
optimizer or DDP wrapper built before the conversion keeps working. transformers' ``Conv1D``
(GPT-2's linear layers, weight stored ``[in, out]``) becomes a MaskedSparseLinear too, with
a new weight Parameter ``[out, in]`` (so its state_dict key holds the transposed weight).
Layers are chosen by :func:`torchslim._layers.select_layers` (``include`` / ``exclude``
names, fnmatch patterns or callables; tied weights such as GPT-2's ``lm_head`` are left
alone). When the model itself is a linear layer, the functions return the new layer.
Structured pruning (:func:`prune_neurons`) returns a new, physically smaller dense model.

Saving and loading a pruned model
---------------------------------
Masks are buffers, so ``model.state_dict()`` holds ``<layer>.weight``, ``<layer>.bias`` and
``<layer>.mask``. To load such a state_dict, rebuild the architecture, convert the same
layers (any sparsity: the loaded masks replace the ones computed here), then load::

    model = Net()
    magnitude_prune(model, 0.0)          # same ``include`` / ``exclude`` as when it was pruned
    model.load_state_dict(torch.load("pruned.pt"))

``layer.to_dense()`` gives back an ``nn.Linear`` holding zeros at the pruned positions.

Determinism (DDP)
-----------------
Masks are a pure function of the weights: weights are ranked by ``|w|`` with a stable sort,
ties broken by layer order then row-major position, without any randomness. Ranks holding
identical weights (as DDP keeps them) therefore compute identical masks. Build the pruner
(which converts the layers) before wrapping the model in DDP, so the mask buffers exist
when DDP registers the module.
"""
from __future__ import annotations

import copy
import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from torchslim._layers import is_conv1d, is_linear_like, linear_parts, select_layers, torch_pruned_parts
from torchslim.nn.masked_sparse_linear import MaskedSparseLinear

__all__ = [
    "magnitude_prune",
    "GradualPruner",
    "iterative_prune",
    "l1_penalty",
    "prune_neurons",
    "prune_heads",
    "sparsity_report",
    "SparsityReport",
    "LayerSparsity",
]

_LINEAR_TYPES = (nn.Linear, MaskedSparseLinear)


# --------------------------------------------------------------------------- validation


def _check_fraction(value, name: str) -> float:
    """A float in [0, 1); ValueError/TypeError naming ``name`` otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_scope(scope) -> str:
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return scope


def _check_finite_weights(layers: Iterable[tuple[str, nn.Module]]) -> None:
    for name, module in layers:
        w = module.weight.detach()
        if isinstance(module, MaskedSparseLinear):  # masked-out entries never reach the output
            w = w[module.mask]
        if torch.isnan(w).any():
            raise ValueError(f"model: the weight of layer {name!r} contains NaN")


def _set_submodule(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace every registration of ``old`` in ``model`` (a module may be registered under
    several names) by ``new``."""
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[child_name] = new


def _masked_parts(name: str, module: nn.Module) -> tuple[nn.Parameter, nn.Parameter | None, torch.Tensor]:
    """(weight Parameter [out, in], bias Parameter or None, mask) for a linear-like layer that
    becomes a MaskedSparseLinear.

    nn.Linear: its own Parameters (shared, so an optimizer built before keeps working).
    transformers Conv1D: a new weight Parameter holding the transposed weight (the bias is
    shared). A layer pruned with torch.nn.utils.prune (``weight_orig`` / ``weight_mask``):
    its ``weight_orig`` (``bias_orig``) Parameter, with the pruned entries set to 0, so the
    old layer still computes what it did. Exact zeros count as pruned: mask = weight != 0.
    """
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise ValueError(f"layer {name!r} is parametrized with torch.nn.utils.parametrize "
                         f"({', '.join(module.parametrizations.keys())}): its weight is computed on every call, so "
                         "it cannot be taken over; call torch.nn.utils.parametrize.remove_parametrizations(layer, "
                         "'weight') first")
    pruned = torch_pruned_parts(module, "weight")
    weight = pruned[0] if pruned is not None else module.weight
    bias_pruned = torch_pruned_parts(module, "bias")
    bias = bias_pruned[0] if bias_pruned is not None else module.bias
    with torch.no_grad():  # what the torch.nn.utils.prune hook computes, made permanent
        for p, part in ((weight, pruned), (bias, bias_pruned)):
            if part is not None:
                p.masked_fill_(part[1].to(p.device) == 0, 0)
    if is_conv1d(module):
        weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
    return weight, bias, weight.detach() != 0


def _to_masked(name: str, module: nn.Module) -> MaskedSparseLinear:
    """A MaskedSparseLinear computing what ``module`` computes (see :func:`_masked_parts`)."""
    weight, bias, mask = _masked_parts(name, module)
    out_f, in_f = weight.shape
    devices = [weight.device.index or 0] if weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the throw-away init must not move the user's RNG
        layer = MaskedSparseLinear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    layer.set_mask(mask)
    layer.train(module.training)
    if is_conv1d(module):
        layer.from_conv1d = True  # saved as "from": "Conv1D", loads into the user's Conv1D skeleton
    return layer


def _convert(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[tuple[str, MaskedSparseLinear]]:
    """Turn the selected layers into MaskedSparseLinear in ``model`` (every registration of
    each); the model itself, when selected, is converted but cannot be replaced in place:
    the caller returns it."""
    out = []
    for name, module in layers:
        if not isinstance(module, MaskedSparseLinear):
            new = _to_masked(name, module)
            _set_submodule(model, module, new)
            module = new
        out.append((name, module))
    return out


# --------------------------------------------------------------------------- magnitude pruning


def _score_dtype(layers) -> torch.dtype:
    return torch.float64 if any(m.weight.dtype == torch.float64 for _, m in layers) else torch.float32


def _prune_group(layers: list[tuple[str, MaskedSparseLinear]], sparsity: float) -> None:
    """Mask the round(sparsity * n) smallest |w| over all ``layers`` together (n = their
    weight count), keeping every already-pruned weight pruned."""
    if not layers:
        return
    device = layers[0][1].weight.device
    dtype = _score_dtype(layers)
    scores, masks = [], []
    for _, m in layers:
        mask = m.mask.detach().reshape(-1).to(device)
        score = m.weight.detach().reshape(-1).to(device=device, dtype=dtype).abs()
        # Already pruned weights rank first, so they are always among the k removed ones.
        scores.append(torch.where(mask, score, torch.full_like(score, -math.inf)))
        masks.append(mask)
    score = torch.cat(scores)
    n = score.numel()
    k = int(round(sparsity * n))
    keep = torch.ones(n, dtype=torch.bool, device=device)
    if k > 0:
        order = torch.sort(score, stable=True).indices  # stable: ties go to the lower position
        keep[order[:k]] = False
    keep &= torch.cat(masks)  # never revive
    offset = 0
    for _, m in layers:
        numel = m.weight.numel()
        new_mask = keep[offset:offset + numel].view_as(m.mask).to(m.mask.device)
        offset += numel
        m.set_mask(new_mask)
        with torch.no_grad():
            m.weight.masked_fill_(~m.mask, 0)


def _prune_layers(layers: list[tuple[str, MaskedSparseLinear]], sparsity: float, scope: str) -> None:
    if scope == "global":
        _prune_group(layers, sparsity)
    else:
        for item in layers:
            _prune_group([item], sparsity)


def _refuse_bare_root(model: nn.Module, layers, what: str) -> None:
    """``what`` keeps working on ``model`` after converting it, which a bare linear root
    (replaced, not modified) would silently escape."""
    if any(name == "" and not isinstance(m, MaskedSparseLinear) for name, m in layers):
        raise ValueError(f"model: {what} needs a model it can convert in place, got a bare {type(model).__name__}; "
                         "pass MaskedSparseLinear.from_dense(layer) (or wrap the layer in nn.Sequential) instead")


def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "global", include=None,
                    exclude=None) -> nn.Module:
    """Prune the smallest-magnitude weights of the model's linear layers, in place.

    Every selected layer becomes a ``MaskedSparseLinear``: an ``nn.Linear`` shares its
    weight and bias Parameters with it; a transformers ``Conv1D`` gets a new weight Parameter
    holding its weight transposed to ``[out, in]`` (build optimizers after pruning); a layer
    pruned with ``torch.nn.utils.prune`` (parametrized: ``weight_orig`` / ``weight_mask``) is
    taken over with its mask, sharing ``weight_orig``. Exact zeros already in a weight count
    as pruned. Then ``k = round(sparsity * n)`` weights are masked: the smallest ``|w|`` of
    each layer (``scope="layer"``, n = the layer's weight count) or of all selected layers
    together (``scope="global"``, n = their total). Weights already masked count towards k
    and stay masked (a higher sparsity prunes further, a lower one changes nothing); ties
    are broken by layer order then row-major position; biases are never pruned. Pruned
    weights are also set to 0 in ``weight``.

    Args:
        model: any nn.Module holding nn.Linear / transformers Conv1D / MaskedSparseLinear
            layers, or one such layer.
        sparsity: target fraction of pruned weights, in [0, 1).
        scope: "global" or "layer".
        include: None (every linear layer), a module name or fnmatch pattern, a list of
            them, or a callable ``(name, module) -> bool``.
        exclude: the same forms; these layers are left alone (e.g. ``"*lm_head"``).
        See :mod:`torchslim._layers` for the selection rules (MultiheadAttention's
        ``out_proj`` is never pruned; tied layers are skipped with a warning, or refused
        when ``include`` names them).

    Returns:
        ``model``, modified in place; when ``model`` itself is a linear layer, the new
        MaskedSparseLinear (so always use the return value).
    """
    _check_model(model)
    sparsity = _check_fraction(sparsity, "sparsity")
    scope = _check_scope(scope)
    layers = select_layers(model, include, exclude, purpose="prune")
    _check_finite_weights(layers)
    layers = _convert(model, layers)
    _prune_layers(layers, sparsity, scope)
    for name, layer in layers:
        if name == "":
            return layer
    return model


class GradualPruner:
    """Zhu & Gupta (2017) gradual magnitude pruning.

    Call :meth:`step` once per optimizer step. With ``t`` the number of ``step()`` calls so
    far, the target sparsity is 0 before ``start_step``, then
    ``s_t = s_f + (s_i - s_f) * (1 - (t' - t0) / (t_end - t0))**3`` where ``t'`` is ``t``
    rounded down to the last pruning step (``t0 + j * frequency``), and ``s_f`` from
    ``end_step`` on. Whenever the target changes the masks are recomputed with
    :func:`magnitude_prune` (never reviving a weight). The selected layers are converted to
    ``MaskedSparseLinear`` when the pruner is built (and pruned to ``s_i`` if
    ``start_step == 0``); build the optimizer after the pruner (a Conv1D gets a new,
    transposed weight Parameter). ``include`` / ``exclude`` select the layers as in
    :func:`magnitude_prune`; ``model`` must be convertible in place (not a bare nn.Linear).
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int,
                 frequency: int = 1, initial_sparsity: float = 0.0, scope: str = "global", include=None,
                 exclude=None):
        _check_model(model)
        self.final_sparsity = _check_fraction(final_sparsity, "final_sparsity")
        self.initial_sparsity = _check_fraction(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity ({self.initial_sparsity}) must not exceed final_sparsity "
                             f"({self.final_sparsity}): pruned weights are never revived")
        self.start_step = _check_int(start_step, "start_step", 0)
        self.end_step = _check_int(end_step, "end_step", 0)
        if self.end_step < self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be >= start_step ({self.start_step})")
        self.frequency = _check_int(frequency, "frequency", 1)
        self.scope = _check_scope(scope)
        self.include = include
        self.exclude = exclude
        self.model = model
        layers = select_layers(model, include, exclude, purpose="prune")
        _refuse_bare_root(model, layers, "GradualPruner")
        _check_finite_weights(layers)
        # After conversion the layers are found by identity (names may shift under wrappers).
        self._layer_ids = {id(m) for _, m in _convert(model, layers)}
        self.step_count = 0
        self._applied = None
        self._apply()

    def sparsity_at(self, step: int) -> float:
        """The schedule's target sparsity after ``step`` calls of :meth:`step`."""
        t = int(step)
        if t < self.start_step:
            return 0.0
        if t >= self.end_step:
            return self.final_sparsity
        t = self.start_step + (t - self.start_step) // self.frequency * self.frequency
        progress = (t - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    @property
    def sparsity(self) -> float:
        """The current target sparsity."""
        return self.sparsity_at(self.step_count)

    def _apply(self) -> None:
        target = self.sparsity
        if target != self._applied:
            layers = [(n, m) for n, m in self.model.named_modules() if id(m) in self._layer_ids]
            _check_finite_weights(layers)
            _prune_layers(layers, target, self.scope)
            self._applied = target

    def step(self) -> float:
        """Advance one optimizer step; re-prune when the schedule says so. Returns the target."""
        self.step_count += 1
        self._apply()
        return self.sparsity

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = _check_int(state["step_count"], "state['step_count']", 0)
        self._applied = None
        self._apply()


def iterative_prune(model: nn.Module, sparsities: Sequence[float], train_fn: Callable[[nn.Module], object],
                    scope: str = "global", include=None, exclude=None) -> list:
    """Han et al. (2015) prune -> retrain loop: for each sparsity (non-decreasing), prune with
    :func:`magnitude_prune` (same ``scope`` / ``include`` / ``exclude``), then call
    ``train_fn(model)`` (which fine-tunes the surviving weights; masked weights get zero
    gradient). ``model`` is pruned in place, so it must not be a bare nn.Linear. Returns the
    list of ``train_fn`` results."""
    _check_model(model)
    if is_linear_like(model):
        _refuse_bare_root(model, [("", model)], "iterative_prune")
    if not callable(train_fn):
        raise TypeError(f"train_fn must be callable(model), got {type(train_fn).__name__}")
    values = [_check_fraction(s, f"sparsities[{i}]") for i, s in enumerate(sparsities)]
    if not values:
        raise ValueError("sparsities must hold at least one value")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"sparsities must be non-decreasing, got {values[i - 1]} then {values[i]} at index {i}")
    results = []
    for s in values:
        magnitude_prune(model, s, scope=scope, include=include, exclude=exclude)
        results.append(train_fn(model))
    return results


def _kept_weight(module: nn.Module) -> torch.Tensor:
    """The weight a linear-like layer computes with (any layout: only its entries matter)."""
    if isinstance(module, MaskedSparseLinear):
        return module.weight * module.mask.to(module.weight.dtype)
    pruned = torch_pruned_parts(module, "weight")
    if pruned is not None:  # torch.nn.utils.prune: read the Parameter, not the hook's last result
        return pruned[0] * pruned[1].to(pruned[0].dtype)
    return module.weight


def l1_penalty(model: nn.Module, include=None, exclude=None) -> torch.Tensor:
    """Differentiable ``sum |w|`` over the (kept) weights of the model's linear layers
    (``nn.Linear``, transformers ``Conv1D``, ``MaskedSparseLinear``; masked weights do not
    count), selected by ``include`` / ``exclude`` as in :func:`magnitude_prune` (tied layers
    are left out). Add ``lam * l1_penalty(model)`` to the loss for L1 regularisation."""
    _check_model(model)
    layers = select_layers(model, include, exclude, purpose="penalty")
    if not layers:
        raise ValueError("l1_penalty: no linear layer left to penalise (every selected layer is tied or skipped)")
    device = layers[0][1].weight.device
    total = None
    for _, m in layers:
        term = _kept_weight(m).abs().sum().to(device)
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------- reports


@dataclass
class LayerSparsity:
    name: str
    kind: str
    shape: tuple
    weights: int
    kept: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.weights if self.weights else 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "weights": self.weights,
                "kept": self.kept, "sparsity": self.sparsity}


@dataclass
class SparsityReport:
    layers: list = field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.weights if self.weights else 0.0

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, key):
        if isinstance(key, str):
            for layer in self.layers:
                if layer.name == key:
                    return layer
            raise KeyError(key)
        return self.layers[key]

    def to_dict(self) -> dict:
        return {"layers": [layer.to_dict() for layer in self.layers],
                "total": {"weights": self.weights, "kept": self.kept, "sparsity": self.sparsity}}

    def to_markdown(self) -> str:
        lines = ["| layer | type | shape | weights | kept | sparsity |", "|---|---|---|---:|---:|---:|"]
        for layer in self.layers:
            shape = "x".join(str(s) for s in layer.shape)
            lines.append(f"| {layer.name} | {layer.kind} | {shape} | {layer.weights} | {layer.kept} | "
                         f"{100 * layer.sparsity:.2f}% |")
        lines.append(f"| **total** | | | {self.weights} | {self.kept} | {100 * self.sparsity:.2f}% |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Per linear layer (nn.Linear, transformers Conv1D, MaskedSparseLinear, CodebookLinear;
    chosen as the workflow functions choose them, so MultiheadAttention's ``out_proj`` is
    not listed) and in total: weight count, kept weights (mask entries for
    MaskedSparseLinear, non-zeros otherwise, torch.nn.utils.prune masks applied) and
    sparsity. ``shape`` is ``(out_features, in_features)`` whatever the storage layout."""
    _check_model(model)
    report = SparsityReport()
    for name, m in select_layers(model, purpose="report"):
        if isinstance(m, MaskedSparseLinear):
            kept = int(m.mask.sum().item())
            shape = tuple(m.mask.shape)
        elif is_linear_like(m):
            kept = int((_kept_weight(m).detach() != 0).sum().item())
            _, _, in_f, out_f = linear_parts(m)
            shape = (out_f, in_f)
        else:  # CodebookLinear
            w = m.weight.detach()
            kept = int((w != 0).sum().item())
            shape = tuple(w.shape)
        weights = int(math.prod(shape))
        report.layers.append(LayerSparsity(name or "(model)", type(m).__name__, shape, weights, kept))
    return report


# --------------------------------------------------------------------------- structured pruning
# Whole-model structured pruning (hidden neurons, attention heads) lives in torchslim.structured.

from torchslim.structured import prune_heads, prune_neurons  # noqa: E402,F401
