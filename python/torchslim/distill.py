"""Training helpers for any model and DataLoader: ``fit`` (plain supervised training, e.g.
fine-tuning after pruning or weight sharing) and ``distill`` (Hinton et al.'s knowledge
distillation with ``torchslim.nn.KDLoss``), plus ``accuracy``.

Batches are ``(inputs, targets)`` or ``(inputs, targets, indices)`` tuples/lists (extra
items are ignored by ``fit``). Progress bars use tqdm and are switched off with
``progress=False``.

Cached teacher logits (``distill(..., cache_teacher_logits=True)``): the teacher runs once
per training sample and its logits are reused in later epochs. The cache is keyed by the
sample's index in the dataset, so the rule is: every sample must always be the same
tensor (no random augmentation), and the batches must say which samples they hold. Either
the loader yields ``(inputs, targets, indices)`` (wrap a dataset in ``IndexedDataset``), or
it is a ``torch.utils.data.DataLoader`` over a map-style dataset, which ``distill`` then
re-creates around ``IndexedDataset(loader.dataset)`` with the same batch sampler, collate
function and workers (so the sampling order is unchanged).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["fit", "distill", "accuracy", "evaluate_loss", "IndexedDataset", "make_optimizer"]


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that item ``i`` is ``(*dataset[i], i)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)):
            item = (item,)
        return (*item, i)


def _device_of(model: nn.Module, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def make_optimizer(model: nn.Module, optimizer="adam", lr: float = 1e-3, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """``"adam"`` | ``"sgd"`` (with momentum) | an Optimizer instance (returned as is)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam', 'sgd' or a torch.optim.Optimizer, got {optimizer!r}")


def _split_batch(batch, what: str):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"{what}: each batch must be an (inputs, targets[, indices]) tuple, got {type(batch).__name__}")
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else None)


def _progress(iterable, progress: bool, desc: str, total=None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False, dynamic_ncols=True)


def _check_positive(name, value, integer=False):
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    elif not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")


def fit(model: nn.Module, loader: Iterable, epochs: int = 1, lr: float = 1e-3, optimizer="adam",
        loss_fn: Optional[Callable] = None, progress: bool = True, *, device=None, weight_decay: float = 0.0,
        on_step: Optional[Callable[[int], None]] = None, desc: str = "fit") -> list[float]:
    """Train ``model`` on ``loader`` for ``epochs``; returns the mean loss of each epoch.

    ``loss_fn(outputs, targets)`` defaults to cross entropy. ``optimizer``: "adam", "sgd"
    or an Optimizer. ``on_step(step)`` runs after every optimizer step (e.g.
    ``GradualPruner.step``). The model is left in train mode.
    """
    _check_positive("epochs", epochs, integer=True)
    _check_positive("lr", lr)
    loss_fn = loss_fn or F.cross_entropy
    dev = _device_of(model, device)
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    return _train_epochs(model, loader, opt, epochs, dev, lambda x, y, idx: loss_fn(model(x), y),
                         on_step, progress, desc, "fit")


def _train_epochs(model: nn.Module, loader: Iterable, opt, epochs: int, dev, batch_loss: Callable,
                  on_step: Optional[Callable[[int], None]], progress: bool, desc: str, caller: str) -> list[float]:
    """The loop fit and distill share: per batch, ``batch_loss(x, y, idx)`` on the device,
    backward, optimizer step, ``on_step(step)``; returns the mean loss of each epoch."""
    model.train()
    history = []
    step = 0
    for epoch in range(epochs):
        total, count = 0.0, 0
        bar = _progress(loader, progress, f"{desc} {epoch + 1}/{epochs}")
        for batch in bar:
            x, y, idx = _split_batch(batch, caller)
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(x, y, idx)
            loss.backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step)
            n = x.shape[0]
            total += float(loss.detach()) * n
            count += n
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}", refresh=False)
        bar.close()
        history.append(total / max(count, 1))
    return history


def _indexed_loader(loader):
    """The same loader yielding (inputs, targets, indices), or a ValueError naming the rule."""
    if not isinstance(loader, DataLoader):
        raise ValueError("cache_teacher_logits=True needs batches (inputs, targets, indices) — wrap the dataset in "
                         "torchslim.distill.IndexedDataset — or a torch DataLoader over a map-style dataset")
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise ValueError("cache_teacher_logits=True needs a map-style dataset (indexable), or batches that carry "
                         "their sample indices as a third item")
    return DataLoader(IndexedDataset(dataset), batch_sampler=loader.batch_sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                      persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False)


class _TeacherCache:
    """Teacher logits per dataset index, filled the first time a sample is seen."""

    def __init__(self):
        self.logits: Optional[torch.Tensor] = None
        self.filled: Optional[torch.Tensor] = None
        self.teacher_samples = 0  # how many samples the teacher has processed

    def _grow(self, size: int, like: torch.Tensor) -> None:
        logits = torch.zeros((size, *like.shape[1:]), dtype=like.dtype, device=like.device)
        filled = torch.zeros(size, dtype=torch.bool, device=like.device)
        if self.logits is not None:
            n = self.logits.shape[0]
            logits[:n] = self.logits
            filled[:n] = self.filled
        self.logits, self.filled = logits, filled

    def get(self, teacher, x, idx, dev):
        if idx is None:
            raise ValueError("cache_teacher_logits=True: the batches must carry sample indices as a third item")
        idx = torch.as_tensor(idx, device=dev).long().reshape(-1)
        if idx.numel() != x.shape[0]:
            raise ValueError(f"batch holds {x.shape[0]} samples but {idx.numel()} indices")
        if bool((idx < 0).any()):
            raise ValueError("sample indices must be non-negative")
        n = 0 if self.filled is None else self.filled.shape[0]
        in_range = idx < n
        missing = ~in_range
        if n:
            missing[in_range] = ~self.filled[idx[in_range]]
        if bool(missing.any()):
            rows = missing.nonzero().reshape(-1)
            with torch.no_grad():
                out = teacher(x[rows]).detach()
            self.teacher_samples += rows.numel()
            need = int(idx.max()) + 1
            if self.logits is None or need > n:
                self._grow(max(need, 2 * n), out)
            self.logits[idx[rows]] = out
            self.filled[idx[rows]] = True
        return self.logits[idx]


def distill(student: nn.Module, teacher: nn.Module, loader: Iterable, epochs: int = 1, lr: float = 1e-3,
            temperature: float = 4.0, alpha: float = 0.9, optimizer="adam", cache_teacher_logits: bool = False,
            progress: bool = True, *, device=None, weight_decay: float = 0.0,
            on_step: Optional[Callable[[int], None]] = None, desc: str = "distill", stats: Optional[dict] = None,
            mixup: bool = False, seed: int = 0) -> list[float]:
    """Train ``student`` to match ``teacher`` with ``KDLoss(temperature, alpha)`` (soft
    targets from the teacher plus ``1 - alpha`` of the hard-label loss); returns the mean
    loss of each epoch.

    ``mixup=True`` adds a transfer set (Hinton et al.'s term): with every batch, a batch of
    mixed inputs ``lam * x_i + (1 - lam) * x_j`` (``lam ~ U(0, 1)``, ``j`` a permutation of
    the batch, drawn from a generator seeded with ``seed``) that only the teacher labels
    (soft targets, weight 1). A teacher trained on the same samples is nearly one-hot on
    them, so its dark knowledge shows mostly between the samples; this costs one teacher
    forward per step for the mixed batch (never cached).

    The teacher runs in eval mode under ``no_grad`` (its mode is restored afterwards) and
    is never updated. With ``cache_teacher_logits=True`` it runs once per sample (see the
    module docstring for the rule). ``stats``, when given a dict, receives
    ``teacher_samples`` (how many samples the teacher processed).
    """
    from torchslim.nn import KDLoss

    _check_positive("epochs", epochs, integer=True)
    _check_positive("lr", lr)
    if student is teacher:
        raise ValueError("student and teacher must be different modules")
    dev = _device_of(student, device)
    kd = KDLoss(temperature=temperature, alpha=alpha)
    opt = make_optimizer(student, optimizer, lr, weight_decay)
    cache = _TeacherCache() if cache_teacher_logits else None
    if cache_teacher_logits and isinstance(loader, DataLoader) and not isinstance(loader.dataset, IndexedDataset):
        loader = _indexed_loader(loader)  # other iterables must yield (inputs, targets, indices)
    soft = KDLoss(temperature=temperature, alpha=1.0) if mixup else None
    gen = torch.Generator(device=dev).manual_seed(int(seed)) if mixup else None
    teacher_was_training = teacher.training
    teacher.eval()
    teacher_samples = 0

    def batch_loss(x, y, idx):
        nonlocal teacher_samples
        if cache is not None:
            t_logits = cache.get(teacher, x, idx, dev)
        else:
            with torch.no_grad():
                t_logits = teacher(x).detach()
            teacher_samples += x.shape[0]
        if soft is None or x.shape[0] <= 1:
            return kd(student(x), t_logits, y)
        n = x.shape[0]
        perm = torch.randperm(n, generator=gen, device=dev)
        lam = torch.rand((n,) + (1,) * (x.dim() - 1), generator=gen, device=dev, dtype=x.dtype)
        xm = lam * x + (1 - lam) * x[perm]
        with torch.no_grad():
            tm = teacher(xm).detach()
        teacher_samples += n
        out = student(torch.cat([x, xm]))
        return kd(out[:n], t_logits, y) + soft(out[n:], tm)

    try:
        history = _train_epochs(student, loader, opt, epochs, dev, batch_loss, on_step, progress, desc, "distill")
    finally:
        teacher.train(teacher_was_training)
    if stats is not None:
        stats["teacher_samples"] = teacher_samples + (cache.teacher_samples if cache is not None else 0)
    return history


@torch.no_grad()
def accuracy(model: nn.Module, data, targets: Optional[torch.Tensor] = None, batch_size: int = 2048, device=None) -> float:
    """Top-1 accuracy in [0, 1] on ``(inputs, targets)`` tensors or a loader of batches.
    Runs in eval mode and restores the model's mode."""
    dev = _device_of(model, device)
    was_training = model.training
    model.eval()
    correct = count = 0
    try:
        if targets is not None:
            batches = ((data[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(data), batch_size))
        else:
            batches = data
        for batch in batches:
            x, y, _ = _split_batch(batch, "accuracy")
            pred = model(x.to(dev)).argmax(-1)
            correct += int((pred == y.to(dev)).sum())
            count += y.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("accuracy: no samples")
    return correct / count


@torch.no_grad()
def evaluate_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Optional[Callable] = None) -> float:
    """Mean loss of ``model`` on tensors (eval mode)."""
    loss_fn = loss_fn or F.cross_entropy
    was_training = model.training
    model.eval()
    try:
        return float(loss_fn(model(x), y))
    finally:
        model.train(was_training)
