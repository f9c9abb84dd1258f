"""Structured pruning of whole models: hidden neurons (:func:`prune_neurons`) and attention
heads (:func:`prune_heads`). Both return a new, physically smaller model (a deep copy; the
input model is untouched) or, with ``dry_run=True``, the :class:`PruningPlan` they would apply.

How hidden dimensions are found
-------------------------------
A *hidden dimension* is the output width of one or more linear layers (``nn.Linear``,
:class:`~torchslim.nn.MaskedSparseLinear`, transformers' ``Conv1D``) that reaches the input of
one or more linear layers only through element-wise ops (activations, dropout, arithmetic
with scalars, a gated product of two such outputs), layout ops that leave the last dimension
alone (``view``/``reshape`` of the leading dims, ``x[:, 0]``, transposes of other dims,
reductions and softmax over other dims) and per-feature normalisation (``BatchNorm1d`` on 2-D
input, ``PReLU``). Layers whose outputs meet in an element-wise op (Llama's
``act(gate_proj(x)) * up_proj(x)``) form one *coupled group*: their rows are scored together
(sum of the criterion over the group's rows) and removed together, and the consumers'
columns follow.

The graph is discovered by running the model once on ``example_inputs`` under a
``TorchFunctionMode`` that tags every tensor derived element-wise from a linear layer's output
(module hooks mark where linear layers begin and end, so ``Conv1D``'s internal reshapes are
never seen). Without ``example_inputs``, transformers models use their ``dummy_inputs`` and
other models are traced symbolically with ``torch.fx`` (no shapes: only element-wise ops
are followed). Anything else that meets a hidden dimension (a residual add, a head split
``view``, concatenation along it, a reduction or LayerNorm over it, a layer called twice, weight
tying, the model's output) leaves that dimension alone; it is reported (a warning, or the
plan's ``skipped`` list) and ``strict=True`` turns it into a ValueError. A linear layer whose
output only reaches the model's output (a classifier head) is not a hidden dimension.
"""
from __future__ import annotations

import copy
import fnmatch
import numbers
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from torchslim._layers import is_conv1d, select_layers
from torchslim.nn.masked_sparse_linear import MaskedSparseLinear

__all__ = ["prune_neurons", "prune_heads", "PruningPlan", "PlanGroup", "StructuredPruningWarning"]


class StructuredPruningWarning(UserWarning):
    """Some hidden dimensions or attention modules were left alone (see the message)."""


# --------------------------------------------------------------------------- the plan


@dataclass
class PlanGroup:
    """One hidden dimension (``unit="neurons"``) or one attention module's heads
    (``unit="heads"`` / ``"kv groups"``): the layers whose rows (``producers``) and columns
    (``consumers``) are cut, per-feature modules sliced with them (``between``), the width
    before and after, and ``reason`` when it is skipped (``width_after`` is then None)."""

    producers: list[str]
    consumers: list[str]
    width_before: int
    width_after: int | None = None
    between: list[str] = field(default_factory=list)
    unit: str = "neurons"
    module: str | None = None
    reason: str | None = None
    keep: list[int] | None = None

    @property
    def skipped(self) -> bool:
        return self.reason is not None

    def describe(self) -> str:
        if self.module is not None:
            return f"attention {self.module!r}"
        return " + ".join(f"layer {p!r}" for p in self.producers)

    def to_dict(self) -> dict:
        d = {"producers": list(self.producers), "consumers": list(self.consumers), "between": list(self.between),
             "unit": self.unit, "width_before": self.width_before, "width_after": self.width_after}
        if self.module is not None:
            d["module"] = self.module
        if self.reason is not None:
            d["reason"] = self.reason
        return d


@dataclass
class PruningPlan:
    """What :func:`prune_neurons` / :func:`prune_heads` cut (``groups``) and leave alone
    (``skipped``, each with its reason). ``outputs`` names the linear layers whose output only
    reaches the model's output (not hidden dimensions; nothing to do)."""

    groups: list[PlanGroup] = field(default_factory=list)
    skipped: list[PlanGroup] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    discovery: str = ""

    def to_dict(self) -> dict:
        return {"discovery": self.discovery, "groups": [g.to_dict() for g in self.groups],
                "skipped": [g.to_dict() for g in self.skipped], "outputs": list(self.outputs)}

    def to_markdown(self) -> str:
        lines = ["| group | consumers | unit | before | after |", "|---|---|---|---|---|"]
        for g in self.groups:
            lines.append(f"| {g.describe()} | {', '.join(g.consumers)} | {g.unit} | {g.width_before} | {g.width_after} |")
        for g in self.skipped:
            lines.append(f"| {g.describe()} | {', '.join(g.consumers)} | {g.unit} | {g.width_before} | skipped: {g.reason} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _skip_message(skipped: list[PlanGroup], limit: int | None = None) -> str:
    shown = skipped if limit is None else skipped[:limit]
    text = "; ".join(f"{g.describe()}: {g.reason}" for g in shown)
    if limit is not None and len(skipped) > limit:
        text += f"; ... and {len(skipped) - limit} more (dry_run=True lists them all)"
    return text


# --------------------------------------------------------------------------- arguments and layers


def _check_common(model, amount, criterion) -> float:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"amount must be a real number in [0, 1), got {type(amount).__name__}")
    amount = float(amount)
    if not (0.0 <= amount < 1.0):  # also rejects NaN
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    if criterion not in ("l1", "l2"):
        raise ValueError(f"criterion must be 'l1' or 'l2', got {criterion!r}")
    return amount


def _is_linear(m: nn.Module) -> bool:
    return type(m) is not nn.Identity and (isinstance(m, (nn.Linear, MaskedSparseLinear)) or is_conv1d(m))


def _out_features(m: nn.Module) -> int:
    return int(m.nf) if is_conv1d(m) else int(m.out_features)


def _in_features(m: nn.Module) -> int:
    return int(m.weight.shape[0]) if is_conv1d(m) else int(m.in_features)


def _weight(m: nn.Module) -> torch.Tensor:
    """Weight as ``[out, in]`` float64 with masked-out entries zero."""
    w = m.weight.detach()
    if is_conv1d(m):
        w = w.t()
    if isinstance(m, MaskedSparseLinear):
        w = w * m.mask.to(w.dtype)
    return w.to(torch.float64)


def _norms(w: torch.Tensor, criterion: str, dim: int) -> torch.Tensor:
    return w.abs().sum(dim) if criterion == "l1" else w.pow(2).sum(dim).sqrt()


def _kept(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Indices (sorted) of the units kept: the ``amount`` fraction with the smallest score is
    removed (stable: ties go to the lower index), at least one unit stays."""
    n = scores.numel()
    remove = min(int(round(amount * n)), n - 1)
    order = torch.sort(scores.cpu(), stable=True).indices
    return torch.sort(order[remove:]).values


def _check_pattern_arg(value, name):
    if value is None or callable(value):
        return value
    items = [value] if isinstance(value, str) else value
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{name} must be None, a module name or fnmatch pattern, a list of them or a callable "
                        f"(name, module) -> bool, got {type(value).__name__}") from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name}: names and patterns must be str, got {type(item).__name__} {item!r}")
    if not items:
        raise ValueError(f"{name}: the list of names is empty")
    return items


def _match(candidates: list[tuple[str, nn.Module]], include, exclude, what: str) -> set[str]:
    """Names among ``candidates`` that ``include`` selects and ``exclude`` does not (names,
    fnmatch patterns or a callable). A name or pattern that matches no candidate is an error."""
    include = _check_pattern_arg(include, "include")
    exclude = _check_pattern_arg(exclude, "exclude")

    def pick(spec, arg):
        if callable(spec):
            return {n for n, m in candidates if spec(n, m)}
        chosen = set()
        for pat in spec:
            hit = {n for n, _ in candidates if n == pat or fnmatch.fnmatchcase(n, pat)}
            if not hit:
                raise ValueError(f"{arg}: {pat!r} matches none of the model's {what} "
                                 f"({', '.join(repr(n) for n, _ in candidates[:8])}{', ...' if len(candidates) > 8 else ''})")
            chosen |= hit
        return chosen

    names = {n for n, _ in candidates} if include is None else pick(include, "include")
    if exclude is not None:
        names -= pick(exclude, "exclude")
    return names


def _select_linears(model: nn.Module, include, exclude) -> set[str]:
    """Names of the linear layers whose output width may shrink, by the library's shared
    selector. With no include/exclude, tied layers count as selected too: the plan then
    reports the tie where it blocks a hidden dimension (the selector would only warn)."""
    if include is None and exclude is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            select_layers(model, None, None)  # argument and model checks
        return {n for n, m in model.named_modules() if _is_linear(m)}
    return {n for n, _ in select_layers(model, include, exclude)}


def _call_model(model: nn.Module, example_inputs):
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    raise TypeError("example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
                    f"got {type(example_inputs).__name__}")


def _hf_dummy_inputs(model: nn.Module):
    """transformers models describe a forward pass of their own (``dummy_inputs``)."""
    if not type(model).__module__.startswith("transformers"):
        return None
    try:
        dummy = model.dummy_inputs
    except Exception:
        return None
    if not isinstance(dummy, dict) or not all(isinstance(v, torch.Tensor) for v in dummy.values()):
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return {k: v.to(device) for k, v in dummy.items()}


# --------------------------------------------------------------------------- flow of hidden dimensions


class _Group:
    __slots__ = ("producers", "consumers", "between", "reasons", "joins", "width", "output", "downstream")

    def __init__(self, producer: str, width: int):
        self.producers = [producer]
        self.consumers: list[str] = []
        self.between: list[str] = []
        self.reasons: list[str] = []
        self.joins: list[str] = []  # descriptions of the ops that merged other groups into this one
        self.width = width
        self.output = False  # a tensor of this dimension is part of the model's output
        self.downstream = False  # something holding parameters depends on it


def _add_unique(items: list, value) -> None:
    if value not in items:
        items.append(value)


class _Flow:
    """Union-find over producer groups, and per value (a tensor or an fx node) the group its
    last dimension belongs to (``tag``) and the groups it was derived from by any op (``taint``,
    to tell a blocked hidden dimension from an output that reaches nothing with parameters)."""

    def __init__(self, keyed_by_tensor: bool):
        self.groups: dict[int, _Group] = {}
        self.parent: dict[int, int] = {}
        self.by_producer: dict[str, int] = {}
        self.info = WeakIdKeyDictionary() if keyed_by_tensor else {}
        self.calls: dict[str, int] = {}
        self.where = ""  # innermost module running, for messages

    # union-find
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, gids, why: str) -> int:
        roots = list(dict.fromkeys(self.find(g) for g in gids))
        root = roots[0]
        widths = {self.groups[r].width for r in roots}
        for other in roots[1:]:
            a, b = self.groups[root], self.groups[other]
            for attr in ("producers", "consumers", "between", "reasons", "joins"):
                for v in getattr(b, attr):
                    _add_unique(getattr(a, attr), v)
            a.output |= b.output
            a.downstream |= b.downstream
            self.parent[other] = root
            del self.groups[other]
        if len(roots) > 1:
            _add_unique(self.groups[root].joins, why)
            if len(widths) > 1:
                self.block([root], f"{why} joins dimensions of different widths {sorted(widths)}")
        return root

    def block(self, gids, reason: str) -> None:
        where = f" (in {self.where!r})" if self.where else ""
        for g in gids:
            _add_unique(self.groups[self.find(g)].reasons, reason + where)

    # per-value information
    def get(self, key):
        try:
            return self.info.get(key)
        except TypeError:
            return None

    def tag(self, key):
        i = self.get(key)
        return None if i is None or i[0] is None else self.find(i[0])

    def taint(self, key) -> frozenset:
        i = self.get(key)
        return frozenset() if i is None else i[1]

    def set(self, key, gid, taint) -> None:
        taint = frozenset(t for t in taint if not self.groups[self.find(t)].downstream)
        if gid is None and not taint:
            if self.get(key) is not None:
                del self.info[key]
            return
        self.info[key] = (gid, taint | ({gid} if gid is not None else frozenset()))

    def mark_downstream(self, keys) -> None:
        for k in keys:
            for g in self.taint(k):
                self.groups[self.find(g)].downstream = True

    # events
    def produce(self, key, name: str, width: int, inputs) -> None:
        self.mark_downstream(inputs)
        gid = self.by_producer.get(name)
        if gid is None:
            gid = len(self.parent)
            self.parent[gid] = gid
            self.groups[gid] = _Group(name, width)
            self.by_producer[name] = gid
        self.set(key, self.find(gid), ())

    def consume(self, key, name: str, width: int) -> None:
        self.mark_downstream([key])
        g = self.tag(key)
        if g is None:
            return
        group = self.groups[g]
        if group.width != width:
            self.block([g], f"layer {name!r} takes {width} inputs, not {group.width}")
        _add_unique(group.consumers, name)

    def preserve(self, outs, src) -> None:
        g, t = self.tag(src), self.taint(src)
        for o in outs:
            self.set(o, g, t)

    def opaque(self, outs, ins, reason: str | None) -> None:
        """An op the dimension cannot pass: tagged inputs are blocked, results untagged."""
        tags = [g for g in (self.tag(k) for k in ins) if g is not None]
        if reason is not None and tags:
            self.block(tags, reason)
        taint = frozenset().union(*(self.taint(k) for k in ins)) if ins else frozenset()
        for o in outs:
            self.set(o, None, taint)

    def reach_output(self, keys) -> None:
        for k in keys:
            g = self.tag(k)
            if g is not None:
                self.groups[g].output = True


# --------------------------------------------------------------------------- op tables

_EW_UNARY = {
    "abs", "neg", "negative", "positive", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt",
    "square", "sin", "cos", "tan", "tanh", "sigmoid", "erf", "erfc", "erfinv", "relu", "relu6", "leaky_relu",
    "elu", "selu", "celu", "gelu", "silu", "mish", "softplus", "softsign", "hardtanh", "hardswish", "hardsigmoid",
    "logsigmoid", "tanhshrink", "hardshrink", "softshrink", "threshold", "sign", "floor", "ceil", "round", "trunc",
    "frac", "reciprocal", "clamp", "clip", "clamp_min", "clamp_max", "nan_to_num", "dropout", "alpha_dropout",
    "feature_alpha_dropout", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "cpu", "cuda",
    "requires_grad", "isnan", "isinf", "isfinite", "logical_not", "bitwise_not", "invert", "pos", "fill", "zero",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "data", "sigmoid_", "expit",
}
_EW_BINARY = {
    "add", "sub", "subtract", "rsub", "mul", "multiply", "div", "divide", "true_divide", "truediv", "floordiv",
    "floor_divide", "remainder", "fmod", "mod", "pow", "float_power", "maximum", "minimum", "fmax", "fmin", "where",
    "lerp", "addcmul", "addcdiv", "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
    "logical_xor", "and", "or", "xor", "bitwise_and", "bitwise_or", "bitwise_xor", "copy", "hypot", "atan2",
}
_EW = _EW_UNARY | _EW_BINARY
# Only the first argument carries data; the others give dtype, device or shape.
_CAST = {"to", "type", "type_as"}
_LAYOUT = {"view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
           "expand_as", "broadcast_to", "repeat", "tile", "ravel"}
_TRANSPOSE = {"transpose", "swapaxes", "swapdims", "permute", "t", "T", "mT", "H", "mH", "adjoint", "movedim",
              "moveaxis"}
# name -> (position of the dim argument, keyword, default): default "all" reduces every dim.
_DIM_OPS = {
    **{n: (1, "dim", "all") for n in ("sum", "mean", "nansum", "nanmean", "prod", "amax", "amin", "std", "var",
                                       "all", "any", "median", "argmax", "argmin", "count_nonzero",
                                       "logsumexp", "max", "min")},
    "norm": (2, "dim", "all"),  # x.norm(p, dim)
    **{n: (1, "dim", "all") for n in ("softmax", "log_softmax", "softmin")},
    **{n: (1, "dim", "all") for n in ("cumsum", "cumprod", "cummax", "cummin", "narrow", "select", "index_select",
                                       "gather")},
    **{n: (2, "dim", 0) for n in ("chunk", "split", "tensor_split", "unsafe_split", "split_with_sizes")},
    "unbind": (1, "dim", 0), "sort": (1, "dim", -1), "topk": (2, "dim", -1), "argsort": (1, "dim", -1),
    "flip": (1, "dims", "all"), "roll": (2, "dims", "all"),
}
_CAT = {"cat", "concat", "concatenate", "stack"}
_MATMUL = {"matmul", "bmm", "mm", "rmatmul"}
_FACTORY = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "size", "dim", "numel", "stride",
            "element_size", "is_contiguous", "is_floating_point", "data_ptr", "get_device", "item", "tolist",
            "shape", "dtype", "device", "ndim", "is_cuda", "requires_grad_"}
_DUNDER_BINARY = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor"}


def _func_name(func) -> tuple[str, bool]:
    """(normalised op name, whether it is a Tensor method or property)."""
    name = getattr(func, "__name__", None) or str(func)
    owner = getattr(func, "__self__", None)
    if name == "__get__" and owner is not None:  # a Tensor property (x.T, x.data, x.shape)
        return str(getattr(owner, "__name__", name)), True
    qual = getattr(func, "__qualname__", "") or ""
    method = qual.startswith(("Tensor", "TensorBase", "_TensorBase"))
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        inner = name[2:-2]
        if inner[:1] in ("r", "i") and inner[1:] in _DUNDER_BINARY:
            return ("r" + inner[1:] if inner[:1] == "r" and inner[1:] in ("matmul", "sub") else inner[1:]), True
        return inner, True
    if name.endswith("_") and not name.endswith("__") and len(name) > 1:
        name = name[:-1]  # in-place variant
    return name, method


def _describe_func(func) -> str:
    name, method = _func_name(func)
    return f"method .{name}()" if method else f"function {name}"


def _tensors(obj, out=None) -> list:
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def _norm_dims(dim, ndim: int):
    dims = dim if isinstance(dim, (list, tuple, torch.Size)) else [dim]
    try:
        return {int(d) % ndim for d in dims} if ndim > 0 else set()
    except (TypeError, ValueError):
        return None  # e.g. a named dimension: unknown


def _index_keeps_last_dim(index, ndim: int) -> bool:
    idx = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in idx):
        tail = idx[[i for i, v in enumerate(idx) if v is Ellipsis][0] + 1:]
        return all(isinstance(t, slice) and t == slice(None) or t is None for t in tail)
    consumed = 0
    for i in idx:
        if i is None:
            continue
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
            consumed += max(i.dim(), 1)
        else:
            consumed += 1
    if consumed < ndim:
        return True
    last = [i for i in idx if i is not None][-1] if idx else slice(None)
    return isinstance(last, slice) and last == slice(None)


# --------------------------------------------------------------------------- discovery by running the model


class _Tracker(TorchFunctionMode):
    """Follows hidden dimensions through one forward pass (see the module docstring)."""

    def __init__(self, flow: _Flow, names: dict[int, str]):
        super().__init__()
        self.flow = flow
        self.names = names
        self.inside_leaf = 0
        self.stack: list[str] = []

    # module hooks --------------------------------------------------------
    def pre_hook(self, module, args, kwargs):
        name = self.names.get(id(module), "")
        self.stack.append(name)
        self.flow.where = name
        if self.inside_leaf:
            return
        self.flow.calls[name] = self.flow.calls.get(name, 0) + 1
        if self._is_leaf(module):
            x = args[0] if args else next(iter(kwargs.values()), None)
            module._torchslim_leaf_input = x
            self.inside_leaf += 1

    def post_hook(self, module, args, kwargs, output):
        name = self.stack.pop() if self.stack else ""
        self.flow.where = self.stack[-1] if self.stack else ""
        if not self._is_leaf(module) or self.inside_leaf == 0 or "_torchslim_leaf_input" not in module.__dict__:
            return
        self.inside_leaf -= 1
        if self.inside_leaf:
            return
        x = module.__dict__.pop("_torchslim_leaf_input")
        flow = self.flow
        outs = _tensors(output)
        ins = [x] if isinstance(x, torch.Tensor) else []
        if _is_linear(module):
            if ins:
                flow.consume(x, name, _in_features(module))
            for o in outs:
                flow.produce(o, name, _out_features(module), ins)
            return
        flow.mark_downstream(ins)
        g = flow.tag(x) if ins else None
        if isinstance(module, nn.BatchNorm1d) or (isinstance(module, nn.PReLU) and module.num_parameters > 1):
            width = module.num_features if isinstance(module, nn.BatchNorm1d) else module.num_parameters
            if g is not None and x.dim() == 2 and width == flow.groups[g].width:
                _add_unique(flow.groups[g].between, name)
                flow.preserve(outs, x)
            else:
                flow.opaque(outs, ins, f"it meets module {name!r} ({type(module).__name__}) on a {x.dim()}-D input, "
                                       "which does not normalise over its last dimension")
        elif isinstance(module, nn.PReLU):  # one shared slope: element-wise
            if ins:
                flow.preserve(outs, x)
        else:  # a torchslim layer that cannot be sliced (CodebookLinear)
            flow.opaque(outs, ins, f"it feeds {type(module).__name__} {name!r}, which cannot be sliced "
                                   "(prune neurons before weight sharing)")

    @staticmethod
    def _is_leaf(module) -> bool:
        return (_is_linear(module) or isinstance(module, (nn.BatchNorm1d, nn.PReLU))
                or type(module).__name__ == "CodebookLinear")

    # torch functions -------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.inside_leaf:
            self._follow(func, args, kwargs, out)
        return out

    def _follow(self, func, args, kwargs, out) -> None:
        flow = self.flow
        ins = _tensors((args, kwargs))
        tracked = [t for t in ins if flow.get(t) is not None]
        if not tracked:
            return
        name, _ = _func_name(func)
        if name == "setitem" and len(args) >= 3 and isinstance(args[0], torch.Tensor):
            return self._setitem(args, ins)
        outs = _tensors(out)
        if not outs:
            return  # metadata (x.shape, x.size()) or a Python scalar
        if name in _FACTORY:
            return
        if any(isinstance(t, nn.Parameter) for t in ins):
            flow.mark_downstream(tracked)
        desc = _describe_func(func)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in _EW:
            self._elementwise(outs, ins, desc)
        elif name in _CAST:
            if x is not None:
                flow.preserve(outs, x)
            else:
                flow.opaque(outs, ins, None)
        elif name in _LAYOUT and x is not None:
            if all(o.dim() >= 1 and x.dim() >= 1 and o.shape[-1] == x.shape[-1] for o in outs):
                flow.preserve(outs, x)
            else:
                flow.opaque(outs, ins, f"it meets {desc}, which reshapes its dimension (e.g. a head split)")
        elif name in _TRANSPOSE and x is not None:
            self._transpose(name, args, kwargs, x, outs, ins, desc)
        elif name in _DIM_OPS and x is not None:
            self._dim_op(name, args, kwargs, x, outs, ins, desc)
        elif name == "getitem" and x is not None:
            if x.dim() >= 1 and _index_keeps_last_dim(args[1], x.dim()) and all(
                    o.dim() >= 1 and o.shape[-1] == x.shape[-1] for o in outs):
                flow.preserve(outs, x)
            else:
                flow.opaque(outs, ins, f"it is indexed along its dimension ({desc})")
        elif name in _CAT:
            self._cat(name, args, kwargs, outs, desc)
        elif name in _MATMUL and len(args) >= 2:
            a, b = (args[1], args[0]) if name == "rmatmul" else (args[0], args[1])
            if flow.tag(a) is None and isinstance(b, torch.Tensor) and b.dim() >= 2 and flow.tag(b) is not None:
                flow.preserve(outs, b)  # the rows of `a` mix positions, not features
            else:
                flow.opaque(outs, ins, f"it is contracted by {desc}")
        else:
            what = "a linear map outside a linear layer" if name in ("linear", "addmm", "einsum", "bilinear") \
                else "not a supported element-wise op"
            flow.opaque(outs, ins, f"it meets {desc}, which is {what}")

    def _setitem(self, args, ins) -> None:
        """``x[index] = value`` writes into ``x``: an index along the hidden dimension names
        neurons by position (wrong once others are removed); any other index is an
        element-wise combination of ``x`` and ``value``."""
        x, index = args[0], args[1]
        if x.dim() >= 1 and _index_keeps_last_dim(index, x.dim()):
            self._elementwise([x], ins, "method .__setitem__()")
        else:
            self.flow.opaque([x], ins, "it is written into along its dimension (x[..., i] = ...)")

    def _elementwise(self, outs, ins, desc) -> None:
        flow = self.flow
        tags = [g for g in (flow.tag(t) for t in ins) if g is not None]
        taint = frozenset().union(*(flow.taint(t) for t in ins))
        if not tags:
            for o in outs:
                flow.set(o, None, taint)
            return
        gid = flow.union(tags, f"{desc}")
        width = flow.groups[gid].width
        for t in ins:
            if flow.tag(t) is None and t.dim() > 0 and t.shape[-1] != 1 and t.numel() > 1:
                kind = "a parameter (a per-feature scale)" if isinstance(t, nn.Parameter) \
                    else "other tensors (e.g. a residual connection)"
                flow.block([gid], f"it meets {desc}, which combines it with {kind}")
                break
        for o in outs:
            if o.dim() >= 1 and o.shape[-1] == width:
                flow.set(o, gid, taint)
            else:
                flow.block([gid], f"{desc} changes its last dimension")
                flow.set(o, None, taint)

    def _transpose(self, name, args, kwargs, x, outs, ins, desc) -> None:
        nd = x.dim()
        keeps = False
        if nd <= 1:
            keeps = True
        elif name in ("transpose", "swapaxes", "swapdims") and len(args) >= 3:
            d = _norm_dims([args[1], args[2]], nd)
            keeps = d is not None and (nd - 1 not in d or len(d) == 1)
        elif name == "permute":
            dims = args[1:] if len(args) > 2 or not isinstance(args[1] if len(args) > 1 else None, (list, tuple)) \
                else args[1]
            dims = kwargs.get("dims", dims)
            keeps = bool(dims) and int(dims[-1]) % nd == nd - 1
        if keeps:
            self.flow.preserve(outs, x)
        else:
            self.flow.opaque(outs, ins, f"it meets {desc}, which moves its dimension")

    def _dim_op(self, name, args, kwargs, x, outs, ins, desc) -> None:
        pos, kw, default = _DIM_OPS[name]
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return self._elementwise(outs, ins, desc)  # torch.max(a, b) is element-wise
        dim = kwargs.get(kw, args[pos] if len(args) > pos else default)
        if dim == "all" or dim is None:
            reaches = True
        else:
            d = _norm_dims(dim, x.dim())
            reaches = d is None or x.dim() - 1 in d
        keep = not reaches and all(o.dim() >= 1 and o.shape[-1] == x.shape[-1] for o in outs
                                   if o.dtype.is_floating_point or o.dtype == x.dtype)
        if keep:
            self.flow.preserve(outs, x)
        else:
            self.flow.opaque(outs, ins, f"it meets {desc}, which works across its dimension")

    def _cat(self, name, args, kwargs, outs, desc) -> None:
        flow = self.flow
        parts = list(args[0]) if args and isinstance(args[0], (list, tuple)) else []
        ins = _tensors((args, kwargs))
        dim = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 else 0))
        if not parts or not outs:
            return flow.opaque(outs, ins, f"it meets {desc}")
        nd = outs[0].dim()
        d = _norm_dims(dim, nd)
        tags = [flow.tag(p) for p in parts]
        if d is None or nd - 1 in d or (name == "stack" and parts[0].dim() == 0):
            return flow.opaque(outs, ins, f"it meets {desc} along its dimension, which concatenates features")
        if any(t is None for t in tags):
            return flow.opaque(outs, ins, f"it meets {desc}, which combines it with other tensors")
        gid = flow.union(tags, desc)
        taint = frozenset().union(*(flow.taint(p) for p in parts))
        for o in outs:
            flow.set(o, gid, taint)


def _flow_by_running(model: nn.Module, example_inputs, label: str = "example_inputs") -> _Flow:
    flow = _Flow(keyed_by_tensor=True)
    names = {}
    for n, m in model.named_modules():
        names.setdefault(id(m), n)
    tracker = _Tracker(flow, names)
    handles = []
    training = {m: m.training for m in model.modules()}
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(tracker.post_hook, with_kwargs=True, always_call=True))
        model.eval()  # no running-statistics update, no random dropout while tracing
        with torch.no_grad(), tracker:
            out = _call_model(model, example_inputs)
        outs = _tensors(out if not hasattr(out, "to_tuple") else out.to_tuple())
        flow.reach_output(outs)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        if isinstance(exc, TypeError) and str(exc).startswith("example_inputs"):
            raise
        hint = "" if label == "example_inputs" else " (pass example_inputs=... that the model accepts)"
        raise ValueError(f"{label}: running {type(model).__name__} on them failed{hint}: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.training = t
            m.__dict__.pop("_torchslim_leaf_input", None)
    return flow


# --------------------------------------------------------------------------- discovery with torch.fx (no inputs)


_FX_ELEMENTWISE_MODULES = tuple(getattr(nn, n) for n in (
    "ReLU", "ReLU6", "LeakyReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh",
    "Hardtanh", "Hardswish", "Hardsigmoid", "Softplus", "Softsign", "Tanhshrink", "LogSigmoid",
    "Hardshrink", "Softshrink", "Threshold", "Identity", "Dropout", "AlphaDropout") if hasattr(nn, n))


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        if _is_linear(m) or type(m).__name__ == "CodebookLinear":
            return True
        return super().is_leaf_module(m, qualname)


def _flow_by_fx(model: nn.Module) -> _Flow:
    """Structural version of the tracker: without shapes only element-wise ops (and
    BatchNorm1d / PReLU, assumed to see 2-D input) are followed."""
    from torch.fx.node import Node, map_arg

    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError ...)
        raise ValueError(f"model: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
                         "pass example_inputs=... (a tensor, tuple or dict of keyword inputs) so that "
                         "prune_neurons can follow the model by running it") from exc
    modules = dict(model.named_modules())
    flow = _Flow(keyed_by_tensor=False)

    def inputs(node):
        found = []
        map_arg((node.args, node.kwargs), found.append)
        return found

    for node in graph.nodes:
        ins = inputs(node)
        if node.op == "call_module":
            flow.calls[node.target] = flow.calls.get(node.target, 0) + 1
        if node.op == "output":
            flow.reach_output(ins)
            continue
        if node.op == "get_attr":
            flow.set(node, None, ())
            continue
        if node.op == "placeholder":
            continue
        tracked = [n for n in ins if flow.get(n) is not None]
        if node.op == "call_module":
            m = modules[node.target]
            name = node.target
            desc = f"module {name!r} ({type(m).__name__})"
            if _is_linear(m):
                if ins:
                    flow.consume(ins[0], name, _in_features(m))
                flow.produce(node, name, _out_features(m), ins)
                continue
            has_params = any(True for _ in m.parameters()) or any(True for _ in m.buffers())
            if has_params:
                flow.mark_downstream(ins)
            if not tracked:
                continue
            g = flow.tag(ins[0]) if len(ins) == 1 else None
            if isinstance(m, nn.BatchNorm1d) or (isinstance(m, nn.PReLU) and m.num_parameters > 1):
                width = m.num_features if isinstance(m, nn.BatchNorm1d) else m.num_parameters
                if g is not None and width == flow.groups[g].width:
                    _add_unique(flow.groups[g].between, name)
                    flow.preserve([node], ins[0])
                    continue
            elif g is not None and isinstance(m, _FX_ELEMENTWISE_MODULES + (nn.PReLU,)):
                flow.preserve([node], ins[0])
                continue
            flow.opaque([node], ins, f"it meets {desc}, which is not element-wise")
            continue
        if not tracked:
            continue
        if node.op == "call_function":
            name, _ = _func_name(node.target)
            desc = f"function {name}"
        else:
            name, desc = str(node.target), f"method .{node.target}()"
            name = name[:-1] if name.endswith("_") and not name.endswith("__") else name
        if name in ("size", "dim", "getattr", "numel"):
            continue
        others = [a for a in list(node.args) + list(node.kwargs.values()) if not isinstance(a, Node)]
        if (name in _EW or name in _CAST) and all(isinstance(a, (numbers.Number, torch.dtype, torch.device, str))
                                                  or a is None for a in others):
            data = ins if name in _EW else ins[:1]
            tags = [flow.tag(n) for n in data]
            if all(t is not None for t in tags):
                gid = flow.union(tags, desc)
                flow.set(node, gid, frozenset().union(*(flow.taint(n) for n in ins)))
                continue
            flow.opaque([node], ins, f"it meets {desc}, which combines it with other tensors")
            continue
        flow.opaque([node], ins, f"it meets {desc}, which is not a supported element-wise op")
    return flow


# --------------------------------------------------------------------------- from flow to plan


def _shared_parameters(model: nn.Module) -> set[str]:
    """Names of modules holding a parameter that another module also holds (weight tying)."""
    owners: dict[int, set] = {}
    names: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), n)
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    tied = set()
    for n, m in model.named_modules():
        if any(len(owners[id(p)]) > 1 for p in m.parameters(recurse=False)):
            tied.add(n)
    return tied


def _neuron_plan(model: nn.Module, flow: _Flow, amount: float, criterion: str, selected: set[str],
                 discovery: str) -> PruningPlan:
    modules = dict(model.named_modules())
    tied = _shared_parameters(model)
    plan = PruningPlan(discovery=discovery)
    order = {n: i for i, n in enumerate(modules)}
    for g in flow.groups.values():
        for attr in ("producers", "consumers", "between"):
            getattr(g, attr).sort(key=lambda n: order.get(n, len(order)))
    for gid, g in sorted(flow.groups.items(), key=lambda kv: order[kv[1].producers[0]]):
        if not g.consumers and not (g.reasons and g.downstream):
            plan.outputs.extend(g.producers)  # an output layer, not a hidden dimension
            continue
        if not any(p in selected for p in g.producers):
            continue  # not asked for
        reasons = list(g.reasons)
        if g.output and g.consumers:
            reasons.append("it is also part of the model's output")
        if not g.consumers and not reasons:
            reasons.append("it reaches no linear layer")
        if g.width == 0:
            reasons.append("it has no neurons (width 0)")
        loop = [p for p in g.producers if p in g.consumers]
        if loop:
            how = g.joins[0] if g.joins else "an element-wise op"
            reasons.insert(0, f"it meets {how}, which combines it with other tensors computed from it: "
                              f"{', '.join(repr(p) for p in loop)} both consumes and produces it (a residual connection)")
        for name in dict.fromkeys(g.producers + g.consumers + g.between):
            if flow.calls.get(name, 0) > 1:
                reasons.append(f"module {name!r} is called {flow.calls[name]} times in forward (shared layer)")
            if name in tied:
                reasons.append(f"the parameters of {name!r} are shared with another module (weight tying)")
        unselected = [p for p in g.producers if p not in selected]
        if unselected and not reasons:
            reasons.append(f"it is coupled with {', '.join(repr(p) for p in unselected)}, which include/exclude "
                           "leave out")
        group = PlanGroup(producers=list(g.producers), consumers=list(g.consumers), between=list(g.between),
                          width_before=g.width)
        if reasons:
            reasons = list(dict.fromkeys(reasons))
            more = f"; and {len(reasons) - 3} more" if len(reasons) > 3 else ""
            group.reason = "; ".join(reasons[:3]) + more
            plan.skipped.append(group)
            continue
        for p in group.producers:
            w = modules[p].weight.detach()
            bad = torch.isnan(w[modules[p].mask] if isinstance(modules[p], MaskedSparseLinear) else w).any()
            if bad:
                raise ValueError(f"model: the weight of layer {p!r} contains NaN")
        scores = sum(_norms(_weight(modules[p]), criterion, 1).cpu() for p in group.producers)
        keep = _kept(scores, amount)
        group.keep = keep.tolist()
        group.width_after = int(keep.numel())
        plan.groups.append(group)
    return plan


# --------------------------------------------------------------------------- slicing modules


def _set_submodule(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[child_name] = new


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A shallow copy with its own parameter / buffer / child dicts (keeps the class and
    every plain attribute, e.g. transformers' flags)."""
    new = copy.copy(module)
    new._parameters = OrderedDict(module._parameters)
    new._buffers = OrderedDict(module._buffers)
    new._modules = OrderedDict(module._modules)
    return new


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _slice_linear(layer: nn.Module, rows, cols) -> nn.Module:
    """The linear layer keeping output ``rows`` and input ``cols`` (None: all)."""
    if isinstance(layer, MaskedSparseLinear):
        w, mask = layer.weight.detach(), layer.mask
        if rows is not None:
            w, mask = w[rows.to(w.device)], mask[rows.to(mask.device)]
        if cols is not None:
            w, mask = w[:, cols.to(w.device)], mask[:, cols.to(mask.device)]
        dense = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if layer.bias is not None:
                b = layer.bias.detach()
                dense.bias.copy_(b[rows.to(b.device)] if rows is not None else b)
        new = MaskedSparseLinear.from_dense(dense, mask=mask)
        new.weight.requires_grad_(layer.weight.requires_grad)
        if layer.bias is not None:
            new.bias.requires_grad_(layer.bias.requires_grad)
        new.train(layer.training)
        return new
    conv1d = is_conv1d(layer)
    w = layer.weight.detach()
    if conv1d:
        w = w.t()  # [out, in]
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    new = _fresh_copy(layer)
    new.weight = _param(w.t() if conv1d else w, layer.weight)
    if layer.bias is not None:
        b = layer.bias.detach()
        new.bias = _param(b[rows.to(b.device)] if rows is not None else b, layer.bias)
    if conv1d:
        new.nf = int(w.shape[0])
        if hasattr(new, "nx"):
            new.nx = int(w.shape[1])
    else:
        new.out_features, new.in_features = int(w.shape[0]), int(w.shape[1])
    return new


def _slice_features(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = _fresh_copy(module)
    with torch.no_grad():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 1 and p.numel() > 1:
                setattr(new, pname, _param(p[keep.to(p.device)], p))
        for bname, b in module.named_buffers(recurse=False):
            if b is not None and b.dim() == 1 and b.numel() > 1:
                new._buffers[bname] = b[keep.to(b.device)].clone()
    if isinstance(new, nn.BatchNorm1d):
        new.num_features = int(keep.numel())
    if isinstance(new, nn.PReLU):
        new.num_parameters = int(keep.numel())
    return new


def _apply_neuron_plan(model: nn.Module, plan: PruningPlan) -> None:
    modules = dict(model.named_modules())
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    features: dict[str, torch.Tensor] = {}
    for g in plan.groups:
        keep = torch.tensor(g.keep, dtype=torch.long)
        for p in g.producers:
            rows[p] = keep
        for c in g.consumers:
            cols[c] = keep
        for b in g.between:
            features[b] = keep
    for name in dict.fromkeys([*rows, *cols]):
        old = modules[name]
        _set_submodule(model, old, _slice_linear(old, rows.get(name), cols.get(name)))
    for name, keep in features.items():
        old = modules[name]
        _set_submodule(model, old, _slice_features(old, keep))
    _update_hf_sizes(model, plan)


def _update_hf_sizes(model: nn.Module, plan: PruningPlan) -> None:
    """Keep transformers' size attributes honest. Forward reads widths from the layers, but
    ``intermediate_size`` (``n_inner`` for GPT-2) rebuilds the model in ``from_pretrained``:
    it is updated when every hidden dimension of that width shrank to one new width."""
    modules = dict(model.named_modules())
    for g in plan.groups:
        for p in g.producers:
            parent = modules.get(p.rsplit(".", 1)[0] if "." in p else "")
            if parent is not None and getattr(parent, "intermediate_size", None) == g.width_before:
                parent.intermediate_size = g.width_after
    config = getattr(model, "config", None)
    if config is None or not type(model).__module__.startswith("transformers"):
        return
    for attr in ("intermediate_size", "n_inner"):
        old = getattr(config, attr, None)
        if attr == "n_inner" and old is None and isinstance(getattr(config, "n_embd", None), int) \
                and getattr(config, "model_type", "") == "gpt2":
            old = 4 * config.n_embd
        if not isinstance(old, int):
            continue
        new = {g.width_after for g in plan.groups if g.width_before == old}
        if len(new) == 1 and not any(s.width_before == old for s in plan.skipped):
            setattr(config, attr, new.pop())


# --------------------------------------------------------------------------- prune_neurons


def prune_neurons(model: nn.Module, amount: float, criterion: str = "l1", example_inputs=None, include=None,
                  exclude=None, strict: bool = False, dry_run: bool = False):
    """Structured pruning of every hidden dimension of ``model`` (see the module docstring
    for what counts as one): the ``amount`` fraction of its neurons with the smallest
    incoming-weight norm (``criterion`` "l1" or "l2" of the producer rows, summed over a
    coupled group such as gate_proj + up_proj; ties to the lower index; at least one neuron
    kept) lose their rows in the producers, their entries in BatchNorm1d / PReLU in between
    and their columns in every consumer. The model's input and output widths never change.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs;
    the model runs once on them (in eval mode, without gradients) to discover the graph.
    Without it transformers models use ``model.dummy_inputs`` and other models are traced
    with ``torch.fx`` (a failing trace raises ValueError asking for example_inputs).
    ``include`` / ``exclude``: which producer layers may shrink (names, fnmatch patterns or a
    callable ``(name, module) -> bool``); a coupled group shrinks only if all its producers
    are selected. ``strict=True`` raises ValueError when a selected dimension has to be left
    alone; otherwise skips are reported with a :class:`StructuredPruningWarning` and the rest
    is pruned. When nothing at all can be pruned, ValueError says why.

    Returns a new model (a deep copy, physically smaller; ``model`` is untouched) computing
    the same function as ``model`` with the removed neurons' outgoing columns set to zero;
    with ``dry_run=True`` returns the :class:`PruningPlan` instead (nothing is copied).
    transformers' ``intermediate_size`` / ``n_inner`` follow when all FFNs shrink alike.
    """
    amount = _check_common(model, amount, criterion)
    if not any(_is_linear(m) for m in model.modules()):
        raise ValueError(f"model: {type(model).__name__} has no nn.Linear layer to prune")
    selected = _select_linears(model, include, exclude)
    if example_inputs is None:
        example_inputs = _hf_dummy_inputs(model)
        discovery = "dummy_inputs" if example_inputs is not None else "torch.fx"
    else:
        discovery = "example_inputs"
    flow = _flow_by_fx(model) if discovery == "torch.fx" else _flow_by_running(model, example_inputs, discovery)
    plan = _neuron_plan(model, flow, amount, criterion, selected, discovery)
    if strict and plan.skipped:
        raise ValueError("prune_neurons(strict=True) cannot shrink " + _skip_message(plan.skipped))
    if dry_run:
        return plan
    if not plan.groups:
        if plan.skipped:
            raise ValueError(f"model: prune_neurons cannot shrink any hidden dimension of {type(model).__name__}: "
                             + _skip_message(plan.skipped))
        raise ValueError(f"model: {type(model).__name__} has no hidden layer to shrink "
                         "(no Linear -> element-wise -> Linear chain among the selected layers)")
    if plan.skipped:
        warnings.warn(f"prune_neurons left {len(plan.skipped)} hidden dimension(s) alone: "
                      + _skip_message(plan.skipped, limit=4), StructuredPruningWarning, stacklevel=2)
    new_model = copy.deepcopy(model)
    _apply_neuron_plan(new_model, plan)
    return new_model


# --------------------------------------------------------------------------- attention heads


@dataclass
class _Attention:
    name: str
    kind: str  # "bert", "llama", "gpt2", "timm"
    q: str | None  # separate projections (bert, llama) ...
    k: str | None
    v: str | None
    qkv: str | None  # ... or one fused projection [q | k | v] (gpt2, timm)
    out: str
    heads: int
    kv_heads: int
    head_dim: int


def _child_name(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _forward_source(module: nn.Module) -> str:
    import inspect

    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return ""


def _find_attention(model: nn.Module) -> tuple[list[_Attention], list[tuple[str, str]]]:
    """Known self-attention modules, and (name, reason) for attention-like modules that are not."""
    found, unknown, covered = [], [], set()
    for name, m in model.named_modules():
        sub = getattr(m, "self", None)
        out = getattr(getattr(m, "output", None), "dense", None)
        if isinstance(sub, nn.Module) and all(_is_linear(getattr(sub, a, None) or nn.Identity())
                                              for a in ("query", "key", "value")) \
                and out is not None and _is_linear(out) and hasattr(sub, "attention_head_size"):
            hd = int(sub.attention_head_size)
            heads = _out_features(sub.query) // hd
            found.append(_Attention(name, "bert", _child_name(name, "self.query"), _child_name(name, "self.key"),
                                    _child_name(name, "self.value"), None, _child_name(name, "output.dense"),
                                    heads, heads, hd))
            covered.update({name, _child_name(name, "self"), _child_name(name, "output")})
        elif all(_is_linear(getattr(m, a, None) or nn.Identity()) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and isinstance(getattr(m, "head_dim", None), int):
            hd = int(m.head_dim)
            heads, kv = _out_features(m.q_proj) // hd, _out_features(m.k_proj) // hd
            found.append(_Attention(name, "llama", _child_name(name, "q_proj"), _child_name(name, "k_proj"),
                                    _child_name(name, "v_proj"), None, _child_name(name, "o_proj"), heads, kv, hd))
            covered.add(name)
        elif is_conv1d(getattr(m, "c_attn", nn.Identity())) and is_conv1d(getattr(m, "c_proj", nn.Identity())) \
                and hasattr(m, "num_heads") and hasattr(m, "split_size"):
            if getattr(m, "is_cross_attention", False):
                unknown.append((name, "cross-attention (GPT-2 q_attn) is not supported"))
            else:
                hd = int(m.head_dim)
                found.append(_Attention(name, "gpt2", None, None, None, _child_name(name, "c_attn"),
                                        _child_name(name, "c_proj"), int(m.num_heads), int(m.num_heads), hd))
            covered.add(name)
        elif _is_linear(getattr(m, "qkv", nn.Identity())) and _is_linear(getattr(m, "proj", nn.Identity())) \
                and isinstance(getattr(m, "num_heads", None), int):
            heads = int(m.num_heads)
            hd = int(getattr(m, "head_dim", _out_features(m.qkv) // (3 * heads)))
            if _out_features(m.qkv) != 3 * heads * hd:
                unknown.append((name, f"qkv has {_out_features(m.qkv)} outputs, not 3 x {heads} heads x {hd}"))
            elif "reshape(B, N, C)" in _forward_source(m):
                unknown.append((name, f"{type(m).__name__}.forward reshapes the heads back to the input width "
                                      "(reshape(B, N, C)), so no head can be removed without editing it"))
            else:
                found.append(_Attention(name, "timm", None, None, None, _child_name(name, "qkv"),
                                        _child_name(name, "proj"), heads, heads, hd))
            covered.add(name)
    for name, m in model.named_modules():
        if name in covered or any(name.startswith(c + ".") for c in covered if c):
            continue
        if "attention" in type(m).__name__.lower() and any(True for _ in m.parameters(recurse=False)) \
                or isinstance(m, nn.MultiheadAttention):
            unknown.append((name, f"{type(m).__name__} is not a supported attention module "
                                  "(supported: transformers BERT-, Llama- and GPT-2-style self-attention, timm Attention)"))
    return found, unknown


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _head_plan(model: nn.Module, attn: _Attention, amount: float, criterion: str) -> PlanGroup:
    modules = dict(model.named_modules())
    hd, H, KV = attn.head_dim, attn.heads, attn.kv_heads
    producers = [attn.qkv] if attn.qkv else [attn.q, attn.k, attn.v]
    group = PlanGroup(producers=producers, consumers=[attn.out], width_before=H, module=attn.name, unit="heads")
    if KV != H and (KV <= 0 or H % KV):
        group.reason = f"{H} query heads do not split into {KV} key/value groups"
        return group
    rep = H // KV
    if attn.qkv:
        w = _weight(modules[attn.qkv])
        q, k, v = w[:H * hd], w[H * hd:2 * H * hd], w[2 * H * hd:]
    else:
        q, k, v = (_weight(modules[n]) for n in (attn.q, attn.k, attn.v))
    o = _weight(modules[attn.out])
    if q.shape[0] != H * hd or k.shape[0] != KV * hd or v.shape[0] != KV * hd or o.shape[1] != H * hd:
        group.reason = (f"projection sizes q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}, out {o.shape[1]} do not "
                        f"match {H} heads (key/value {KV}) x head_dim {hd}")
        return group
    per_q = (_norms(q, criterion, 1).view(H, hd).sum(1) + _norms(o, criterion, 0).view(H, hd).sum(1)).cpu()
    per_kv = (_norms(k, criterion, 1).view(KV, hd).sum(1) + _norms(v, criterion, 1).view(KV, hd).sum(1)).cpu()
    if rep > 1:  # grouped-query attention: a key/value head goes with its `rep` query heads
        group.unit = "kv groups"
        group.width_before = KV
        if KV == 1:
            if amount > 0:
                group.reason = ("a single key/value head (multi-query attention): removing it removes every head; "
                                "heads are pruned in whole key/value groups")
            else:
                group.width_after, group.keep = 1, [0]
            return group
        keep = _kept(per_kv + per_q.view(KV, rep).sum(1), amount)
    else:
        keep = _kept(per_kv + per_q, amount)
    group.keep = keep.tolist()
    group.width_after = int(keep.numel())
    return group


def _apply_head_plan(model: nn.Module, attn: _Attention, group: PlanGroup) -> None:
    modules = dict(model.named_modules())
    hd, H, KV = attn.head_dim, attn.heads, attn.kv_heads
    rep = H // KV
    kv_keep = torch.tensor(group.keep, dtype=torch.long)
    q_keep = (kv_keep[:, None] * rep + torch.arange(rep)[None, :]).reshape(-1) if rep > 1 else kv_keep
    q_rows, kv_rows = _head_rows(q_keep, hd), _head_rows(kv_keep, hd)
    if attn.qkv:
        rows = torch.cat([q_rows, H * hd + kv_rows, 2 * H * hd + kv_rows])
        _set_submodule(model, modules[attn.qkv], _slice_linear(modules[attn.qkv], rows, None))
    else:
        _set_submodule(model, modules[attn.q], _slice_linear(modules[attn.q], q_rows, None))
        _set_submodule(model, modules[attn.k], _slice_linear(modules[attn.k], kv_rows, None))
        _set_submodule(model, modules[attn.v], _slice_linear(modules[attn.v], kv_rows, None))
    _set_submodule(model, modules[attn.out], _slice_linear(modules[attn.out], None, q_rows))
    new_h, new_kv = int(q_keep.numel()), int(kv_keep.numel())
    m = modules[attn.name]
    target = m.self if attn.kind == "bert" else m
    for attr, value in (("num_attention_heads", new_h), ("num_heads", new_h), ("num_key_value_heads", new_kv),
                        ("all_head_size", new_h * hd)):
        if isinstance(getattr(target, attr, None), int):
            setattr(target, attr, value)
    if attn.kind == "gpt2":
        m.split_size = new_h * hd
    if attn.kind == "timm" and isinstance(getattr(m, "attn_dim", None), int):
        m.attn_dim = new_h * hd


def prune_heads(model: nn.Module, amount: float, example_inputs=None, criterion: str = "l1", include=None,
                exclude=None, strict: bool = False, dry_run: bool = False):
    """Remove the ``amount`` fraction of whole attention heads (at least one kept) from every
    supported self-attention module: transformers' BERT-style (``self.query/key/value`` +
    ``output.dense``), Llama-style (``q_proj/k_proj/v_proj/o_proj``, grouped-query attention
    included) and GPT-2 (fused ``c_attn`` Conv1D + ``c_proj``), and timm's ``Attention``
    (fused ``qkv`` + ``proj``). A head's score is the ``criterion`` norm ("l1" or "l2") of its
    query, key and value rows plus its output-projection columns, summed; the lowest go.
    Under grouped-query attention whole key/value groups go with their query heads (scored
    together), so ``num_key_value_groups`` is unchanged; multi-query attention (one key/value
    head) is skipped. Head counts on the modules (``num_attention_heads``, ``all_head_size``,
    ``num_heads``, ``num_key_value_heads``, GPT-2's ``split_size``) follow; ``head_dim`` stays.
    The model's ``config`` keeps its original head counts (transformers derives the head size
    from them), so rebuild pruned models from the saved file, not from the config.

    ``include`` / ``exclude`` select attention modules by name (names, fnmatch patterns or a
    callable). Attention-like modules of other types are skipped and reported (a
    :class:`StructuredPruningWarning`; ValueError with ``strict=True``). ``example_inputs``
    (or a transformers model's ``dummy_inputs``), when given, runs the pruned model once to
    check that its forward still works (ValueError naming the failure otherwise).

    Returns a new model (a deep copy; ``model`` is untouched), or with ``dry_run=True`` the
    :class:`PruningPlan` (one group per attention module, unit "heads" or "kv groups").
    """
    amount = _check_common(model, amount, criterion)
    found, unknown = _find_attention(model)
    names = _match([(a.name, dict(model.named_modules())[a.name]) for a in found], include, exclude,
                   "attention modules") if found and (include is not None or exclude is not None) else \
        {a.name for a in found}
    if not found and include is not None:
        raise ValueError("include: the model has no supported attention module")
    plan = PruningPlan(discovery="module structure")
    chosen = []
    tied = _shared_parameters(model)
    for attn in found:
        if attn.name not in names:
            continue
        group = _head_plan(model, attn, amount, criterion)
        shared = [n for n in group.producers + group.consumers if n in tied]
        if shared and group.reason is None:
            group.reason = f"the parameters of {', '.join(map(repr, shared))} are shared with another module (weight tying)"
        if group.reason is not None:
            plan.skipped.append(group)
        else:
            plan.groups.append(group)
            chosen.append((attn, group))
    for name, reason in unknown:
        plan.skipped.append(PlanGroup(producers=[], consumers=[], width_before=0, module=name, unit="heads",
                                      reason=reason))
    if strict and plan.skipped:
        raise ValueError("prune_heads(strict=True) cannot prune " + _skip_message(plan.skipped))
    if dry_run:
        return plan
    if not plan.groups:
        detail = (": " + _skip_message(plan.skipped)) if plan.skipped else ""
        raise ValueError(f"model: {type(model).__name__} has no attention module prune_heads can prune{detail}")
    if plan.skipped:
        warnings.warn(f"prune_heads left {len(plan.skipped)} attention module(s) alone: "
                      + _skip_message(plan.skipped, limit=4), StructuredPruningWarning, stacklevel=2)
    new_model = copy.deepcopy(model)
    for attn, group in chosen:
        _apply_head_plan(new_model, attn, group)
    check = example_inputs if example_inputs is not None else _hf_dummy_inputs(new_model)
    if check is not None:
        try:
            with torch.no_grad():
                _call_model(new_model, check)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ValueError(f"prune_heads: the pruned {type(model).__name__} no longer runs on example_inputs "
                             f"({type(exc).__name__}: {exc}); its attention modules read a head count this "
                             "function does not update") from exc
    return new_model
