"""``torchslim.report``: size, sparsity, file size, latency and accuracy of a (compressed)
model in one record."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn


@dataclass
class CompressionReport:
    """What ``report`` measured.

    ``params_total`` / ``params_nonzero``: parameters of the model's dense equivalent
    (``torchslim.to_dense``: masked weights and codebook indices expanded back to full
    weight matrices; a transformers ``Conv1D`` counts as the linear layer it is; a Parameter
    shared by several modules, e.g. a tied embedding / output head, counts once) and how
    many of them are non-zero. ``bytes_dense``: fp32 size of those
    parameters (4 * params_total). ``bytes_compressed``: size of the file ``torchslim.save``
    writes for the model (``torchslim.io.saved_size``: any nn.Module). ``compression_ratio`` = bytes_dense /
    bytes_compressed. ``latency_ms``: median forward time per batch size ({1: ms, 256: ms}).
    ``accuracy``: ``eval_fn(model)`` or None.
    """

    params_total: int
    params_nonzero: int
    bytes_dense: int
    bytes_compressed: int
    compression_ratio: float
    latency_ms: dict = field(default_factory=dict)
    accuracy: Optional[float] = None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.params_nonzero / max(self.params_total, 1)

    @property
    def latency_b1_ms(self) -> Optional[float]:
        return self.latency_ms.get(1)

    @property
    def latency_b256_ms(self) -> Optional[float]:
        return self.latency_ms.get(256)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency_ms"] = {str(k): v for k, v in self.latency_ms.items()}
        d["latency_b1_ms"] = self.latency_b1_ms
        d["latency_b256_ms"] = self.latency_b256_ms
        d["sparsity"] = self.sparsity
        return d

    def to_markdown(self) -> str:
        def fmt(v, unit=""):
            if v is None:
                return "n/a"
            if isinstance(v, float):
                return f"{v:.4g}{unit}"
            return f"{v:,}{unit}"

        rows = [
            ("parameters", fmt(self.params_total)),
            ("non-zero parameters", f"{fmt(self.params_nonzero)} ({100 * (1 - self.sparsity):.2f}%)"),
            ("dense fp32 size", fmt(self.bytes_dense, " B")),
            ("compressed file size", fmt(self.bytes_compressed, " B")),
            ("compression ratio", f"{self.compression_ratio:.2f}x"),
        ]
        for batch, ms in sorted(self.latency_ms.items()):
            rows.append((f"latency, batch {batch}", fmt(ms, " ms")))
        rows.append(("accuracy", "n/a" if self.accuracy is None else f"{100 * self.accuracy:.2f}%"))
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        return "\n".join(lines) + "\n"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameters of the model's dense equivalent."""
    from torchslim.io import to_dense

    dense = to_dense(model)
    total = nonzero = 0
    with torch.no_grad():
        for p in dense.parameters():
            total += p.numel()
            nonzero += int(torch.count_nonzero(p).item())
    return total, nonzero


def _batch_of(example_input: torch.Tensor, batch: int) -> torch.Tensor:
    n = example_input.shape[0]
    if n == 0:
        raise ValueError("example_input must hold at least one sample (a batch dimension first)")
    idx = torch.arange(batch, device=example_input.device) % n
    return example_input.index_select(0, idx).contiguous()


def measure_latency(model: nn.Module, example_input: torch.Tensor, batch_sizes=(1, 256),
                    min_run_time: float = 0.2, warmup: int = 3) -> dict:
    """Median forward latency in ms per batch size (eval mode, inference_mode; warm-up
    runs, then torch.utils.benchmark's blocked autorange with all threads torch uses)."""
    import torch.utils.benchmark as tbench

    was_training = model.training
    model.eval()
    out = {}
    try:
        with torch.inference_mode():
            for b in batch_sizes:
                x = _batch_of(example_input, int(b))
                for _ in range(warmup):
                    model(x)
                timer = tbench.Timer(stmt="model(x)", globals={"model": model, "x": x},
                                     num_threads=torch.get_num_threads())
                m = timer.blocked_autorange(min_run_time=min_run_time)
                out[int(b)] = float(np.median(np.asarray(m.times))) * 1e3
    finally:
        model.train(was_training)
    return out


def report(model: nn.Module, example_input: torch.Tensor, eval_fn: Callable[[nn.Module], float] | None = None, *,
           batch_sizes=(1, 256), min_run_time: float = 0.2, measure_latency_: bool = True,
           codec: str = "auto") -> CompressionReport:
    """Measure a model: parameter counts, dense fp32 size, the size of the file
    ``torchslim.save`` writes, median latency at batch 1 and 256 (rows of ``example_input``
    repeated to fill the batch), and ``eval_fn(model)`` when given."""
    from torchslim.io import saved_size

    if not isinstance(model, nn.Module):
        raise TypeError(f"report expects an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    total, nonzero = count_parameters(model)
    bytes_dense = 4 * total
    bytes_compressed = saved_size(model, codec=codec)
    latency = measure_latency(model, example_input, batch_sizes, min_run_time) if measure_latency_ else {}
    accuracy = None
    if eval_fn is not None:
        was_training = model.training
        model.eval()
        try:
            accuracy = float(eval_fn(model))
        finally:
            model.train(was_training)
    return CompressionReport(
        params_total=total, params_nonzero=nonzero, bytes_dense=bytes_dense, bytes_compressed=bytes_compressed,
        compression_ratio=bytes_dense / max(bytes_compressed, 1), latency_ms=latency, accuracy=accuracy)


# `torchslim.report` is both this module and the function above: importing the module
# binds the package attribute to the module, so make the module itself callable.
import sys as _sys  # noqa: E402
import types as _types  # noqa: E402


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs) -> CompressionReport:
        return report(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
