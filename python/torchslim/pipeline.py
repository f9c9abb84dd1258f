"""The end-to-end compression pipeline behind ``torchslim run``.

Stages (each optional, each fine-tuned and evaluated on the held-out split):

1. ``dense``: a BP network (``hidden`` layer sizes, ReLU) trained with Adam or SGD;
2. ``pruned``: gradual magnitude pruning (Zhu & Gupta's cubic schedule, global scope) to
   ``sparsity`` while fine-tuning;
3. ``shared``: k-means weight sharing with ``2**bits`` clusters per layer (or one global
   codebook), then fine-tuning of the centroids and biases;
4. ``student`` (when ``student_hidden`` is given): a smaller network distilled from the
   dense teacher with KDLoss, then pruned (``student-pruned``) and shared
   (``student-shared``) the same way.

Every stage is measured with ``torchslim.report`` (accuracy, parameters, non-zeros, size of
the saved file, compression ratio against the dense fp32 model, batch-1 and batch-256
latency). ``report.md``, ``report.json``, PNG plots and the last (deployable) model, saved
with ``torchslim.save``, go to ``out``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

MODEL_FILE = "model.safetensors"


def deployed_weight_bytes(model: nn.Module) -> int:
    """Bytes of a (deployed) model's buffers and parameters, each storage counted once
    (DeployedSequential's fused runs are views of one array)."""
    seen, total = set(), 0
    for t in [*model.buffers(), *model.parameters()]:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@dataclass
class PipelineConfig:
    data: Optional[str] = None          # None: scikit-learn digits; else .npz / .csv / MNIST IDX folder
    seed: int = 0
    test_fraction: float = 0.2
    hidden: Sequence[int] = (300, 100)
    dropout: float = 0.0                 # dropout after each hidden ReLU of the dense network
    optimizer: str = "adam"
    lr: Optional[float] = None           # None: 1e-3 for adam, 0.05 for sgd
    batch_size: int = 64
    epochs: int = 30                     # dense training
    prune: bool = True
    sparsity: float = 0.9
    prune_epochs: int = 30
    share: bool = True
    bits: int = 4
    global_codebook: bool = False
    share_epochs: int = 10
    share_lr: Optional[float] = None     # None: lr / 10
    student_hidden: Optional[Sequence[int]] = None
    # Distillation defaults from benchmarks/notes/kdexp.md (LeNet-300-100 -> 784-100-10 on
    # MNIST, 5 seeds): the teacher's top-1/top-2 logit gap is ~12, so T <= 2 leaves its
    # soft targets one-hot and T = 4 still mostly so; T = 8 carries the class similarities.
    # A student fitting soft targets converges more slowly than one fitting labels, so
    # both students get twice the dense network's epochs.
    distill_epochs: Optional[int] = None  # None: 2 * epochs
    temperature: float = 8.0
    alpha: float = 0.9
    mixup: bool = False                  # distil on a mixup transfer set as well (no gain measured)
    device: str = "cpu"
    out: str = "out"
    progress: bool = True
    plots: bool = True
    latency: bool = True
    latency_min_run_time: float = 0.2
    deploy_sparse: bool = True           # add "deploy" stages: each shared file run by the sparse kernels
    threads: Optional[int] = None        # torch threads for inference / latency (None: torch's default)
    train_threads: Optional[int] = 1     # threads while training (small MLPs train fastest on one)
    verbose: bool = True

    def validate(self) -> None:
        def pos_int(name, v, allow_zero=False):
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")

        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty list of positive layer sizes, got {self.hidden!r}")
        if self.student_hidden is not None and (
                not self.student_hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.student_hidden)):
            raise ValueError(f"student_hidden must be a non-empty list of positive layer sizes, got {self.student_hidden!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8 (codebooks of 2..256 entries), got {self.bits!r}")
        for name in ("epochs", "prune_epochs", "share_epochs"):
            pos_int(name, getattr(self, name), allow_zero=True)
        if self.distill_epochs is not None:
            pos_int("distill_epochs", self.distill_epochs, allow_zero=True)
        pos_int("batch_size", self.batch_size)
        for name in ("lr", "share_lr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        if self.threads is not None:
            pos_int("threads", self.threads)
        if self.train_threads is not None:
            pos_int("train_threads", self.train_threads)
        if not (isinstance(self.latency_min_run_time, (int, float)) and self.latency_min_run_time > 0):
            raise ValueError(f"latency_min_run_time must be > 0 seconds, got {self.latency_min_run_time!r}")


def make_mlp(in_features: int, hidden: Sequence[int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> ReLU [-> Dropout] -> ... -> Linear (a BP network)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def compressed_layers(model: nn.Module):
    """(name, module) of every Linear-like layer (dense, masked or codebook)."""
    from torchslim.nn import CodebookLinear, MaskedSparseLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, MaskedSparseLinear, CodebookLinear))]


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The effective dense weight of a Linear-like layer."""
    from torchslim.nn import MaskedSparseLinear

    with torch.no_grad():
        if isinstance(module, MaskedSparseLinear):
            return (module.weight * module.mask).detach().cpu()
        return module.weight.detach().cpu()


def codebooks(model: nn.Module) -> list[torch.Tensor]:
    from torchslim.nn import CodebookLinear

    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, CodebookLinear) and id(m.codebook) not in seen:
            seen.add(id(m.codebook))
            out.append(m.codebook.detach().cpu())
    return out


class Pipeline:
    def __init__(self, config: PipelineConfig):
        config.validate()
        self.cfg = config
        self.device = torch.device(config.device)
        self.out = Path(config.out)
        self.stages: list[dict] = []
        self.models: dict[str, nn.Module] = {}
        self.log_lines: list[str] = []

    # -- helpers ---------------------------------------------------------------------
    def log(self, msg: str) -> None:
        self.log_lines.append(msg)
        if self.cfg.verbose:
            print(msg, flush=True)

    def _seed(self, offset: int = 0) -> None:
        torch.manual_seed(self.cfg.seed * 1000 + offset)

    def _loader(self, offset: int) -> DataLoader:
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + offset)
        ds = TensorDataset(self.split.x_train, self.split.y_train)
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=True, generator=g)

    @property
    def lr(self) -> float:
        if self.cfg.lr is not None:
            return float(self.cfg.lr)
        return 1e-3 if self.cfg.optimizer == "adam" else 0.05

    @property
    def distill_epochs(self) -> int:
        return self.cfg.distill_epochs if self.cfg.distill_epochs is not None else 2 * self.cfg.epochs

    @property
    def share_lr(self) -> float:
        return float(self.cfg.share_lr) if self.cfg.share_lr is not None else self.lr / 10

    def _accuracy(self, model: nn.Module) -> float:
        from torchslim.distill import accuracy

        return accuracy(model, self.x_test, self.y_test)

    def measure(self, name: str, model: nn.Module, note: str = "", stored: nn.Module | None = None) -> dict:
        """Report a stage. ``stored``: the model whose file is shipped when ``model`` is its
        run-time form (bytes are then that file's size)."""
        import torchslim
        from torchslim.io import saved_size

        r = torchslim.report(model, self.x_test[:256], eval_fn=self._accuracy, measure_latency_=self.cfg.latency,
                             min_run_time=self.cfg.latency_min_run_time)
        if stored is not None:
            r.bytes_compressed = saved_size(stored)
        row = {
            "name": name,
            "accuracy": r.accuracy,
            "params": r.params_total,
            "nonzeros": r.params_nonzero,
            "bytes": r.bytes_compressed,
            "bytes_dense": r.bytes_dense,
            "compression_ratio": None,  # filled against the first (dense) stage below
            "latency_b1_ms": r.latency_ms.get(1),
            "latency_b256_ms": r.latency_ms.get(256),
            "note": note,
        }
        base = self.stages[0]["bytes_dense"] if self.stages else r.bytes_dense
        row["compression_ratio"] = base / max(r.bytes_compressed, 1)
        self.stages.append(row)
        self.models[name] = model
        acc = "n/a" if r.accuracy is None else f"{100 * r.accuracy:.2f}%"
        self.log(f"[{name}] accuracy {acc}, {r.params_nonzero}/{r.params_total} non-zero, {r.bytes_compressed} B "
                 f"({row['compression_ratio']:.1f}x)")
        return row

    @contextlib.contextmanager
    def _training_threads(self):
        old = torch.get_num_threads()
        if self.cfg.train_threads and self.device.type == "cpu":
            torch.set_num_threads(self.cfg.train_threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def _fit(self, model, epochs, lr, desc, offset, on_step=None):
        from torchslim.distill import fit

        if epochs == 0:
            return []
        with self._training_threads():
            return fit(model, self._loader(offset), epochs=epochs, lr=lr, optimizer=self.cfg.optimizer,
                       progress=self.cfg.progress, on_step=on_step, desc=desc)

    # -- stages ----------------------------------------------------------------------
    def train_dense(self, hidden, name: str, offset: int) -> nn.Module:
        self._seed(offset)
        model = make_mlp(self.split.num_features, hidden, self.num_classes, self.cfg.dropout).to(self.device)
        self._fit(model, self.cfg.epochs, self.lr, name, offset)
        return model

    def prune_stage(self, model: nn.Module, name: str, offset: int) -> nn.Module:
        from torchslim.prune import GradualPruner, magnitude_prune

        model = copy.deepcopy(model)
        epochs = self.cfg.prune_epochs
        steps_per_epoch = len(self._loader(offset))
        total = max(1, epochs * steps_per_epoch)
        # Reach the final sparsity two thirds of the way through, then recover at it.
        end_step = max(1, int(total * 2 / 3))
        frequency = max(1, steps_per_epoch // 2)
        # The pruner converts the layers to MaskedSparseLinear when built, so the optimizer
        # (made by fit) sees the masked layers; step() runs after every optimizer step.
        pruner = GradualPruner(model, final_sparsity=self.cfg.sparsity, start_step=0, end_step=end_step,
                               frequency=frequency, initial_sparsity=0.0, scope="global")
        self._fit(model, epochs, self.lr, name, offset, on_step=lambda _step: pruner.step())
        magnitude_prune(model, self.cfg.sparsity)  # exactly the target, whatever the step count
        return model

    def share_stage(self, model: nn.Module, name: str, offset: int) -> nn.Module:
        from torchslim.share import cluster_weights

        model = copy.deepcopy(model)
        scope = "global" if self.cfg.global_codebook else "layer"
        model = cluster_weights(model, num_clusters=2 ** self.cfg.bits, scope=scope, init="linear")
        model.to(self.device)
        self._fit(model, self.cfg.share_epochs, self.share_lr, name, offset)
        return model

    def distill_stage(self, teacher: nn.Module | None, name: str, offset: int) -> nn.Module:
        """A ``student_hidden`` network distilled from ``teacher`` (KDLoss with the config's
        temperature and alpha, cached teacher logits, optional mixup transfer set).

        ``teacher=None`` trains the same student on the labels only with the same budget:
        same initial weights and batch order (both seeded by ``offset``), optimizer, learning
        rate and epochs, i.e. the baseline that distillation has to beat."""
        from torchslim.distill import distill

        self._seed(offset)
        student = make_mlp(self.split.num_features, self.cfg.student_hidden, self.num_classes).to(self.device)
        epochs = self.distill_epochs
        if teacher is None:
            self._fit(student, epochs, self.lr, name, offset)
        elif epochs:
            with self._training_threads():
                distill(student, teacher, self._loader(offset), epochs=epochs, lr=self.lr, temperature=self.cfg.temperature,
                        alpha=self.cfg.alpha, optimizer=self.cfg.optimizer, cache_teacher_logits=True,
                        progress=self.cfg.progress, desc=name, mixup=self.cfg.mixup, seed=self.cfg.seed * 1000 + offset)
        return student

    def compress_chain(self, model: nn.Module, prefix: str, offset: int) -> nn.Module:
        cfg = self.cfg
        if cfg.prune and cfg.sparsity > 0:
            model = self.prune_stage(model, f"{prefix}pruned", offset + 1)
            self.measure(f"{prefix}pruned", model, f"{100 * cfg.sparsity:.0f}% global magnitude pruning")
        if cfg.share:
            self.pre_share_models.append(model)
            model = self.share_stage(model, f"{prefix}shared", offset + 2)
            scope = "global codebook" if cfg.global_codebook else "per-layer codebooks"
            self.measure(f"{prefix}shared", model, f"{cfg.bits}-bit k-means, {scope}")
            self.deployed = self.deploy_stage(model, f"{prefix}deploy")
        return model

    # -- main ------------------------------------------------------------------------
    def run(self) -> dict:
        from torchslim.data import load_dataset

        cfg = self.cfg
        t0 = time.perf_counter()
        old_threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            self.split = load_dataset(cfg.data, seed=cfg.seed, test_fraction=cfg.test_fraction)
            self.num_classes = self.split.num_classes
            self.x_test = self.split.x_test.to(self.device)
            self.y_test = self.split.y_test.to(self.device)
            self.split.x_train = self.split.x_train.to(self.device)
            self.split.y_train = self.split.y_train.to(self.device)
            self.pre_share_models: list[nn.Module] = []
            self.deployed = None
            self.log(f"data {self.split.name}: {len(self.split.y_train)} train / {len(self.split.y_test)} test, "
                     f"{self.split.num_features} features, {self.num_classes} classes; device {self.device}, "
                     f"{torch.get_num_threads()} threads")
            hidden_txt = "-".join(str(h) for h in cfg.hidden)
            dense = self.train_dense(cfg.hidden, "dense", 0)
            self.measure("dense", dense, f"{self.split.num_features}-{hidden_txt}-{self.num_classes} MLP")
            final = self.compress_chain(dense, "", 0)
            if cfg.student_hidden:
                student = self.distill_stage(dense, "student", 10)
                st_txt = "-".join(str(h) for h in cfg.student_hidden)
                self.measure("student", student, f"{self.split.num_features}-{st_txt}-{self.num_classes} distilled "
                                                 f"(T={cfg.temperature}, alpha={cfg.alpha}"
                                                 f"{', mixup transfer set' if cfg.mixup else ''})")
                final = self.compress_chain(student, "student-", 10)
            deploy = self.deployed
            self.stages[-1]["final"] = True
            self.out.mkdir(parents=True, exist_ok=True)
            result = self._write_outputs(final, time.perf_counter() - t0, deploy)
        finally:
            torch.set_num_threads(old_threads)
        return result

    def deploy_stage(self, final: nn.Module, name: str = "deploy") -> nn.Module | None:
        """When the final model shares weights, add a ``deploy`` stage: the same file, run
        as the deployed model (``torchslim.deploy``, what ``load(..., deploy=True)`` gives):
        pruned + shared layers in their compressed form where the path rule says so
        (DeployedSparseCodebookLinear: CSR positions + 4-bit codes + codebook), denser ones
        as decoded sparse layers. The row reports the file's bytes (``bytes``) and the
        deployed model's weight bytes (``weight_bytes``: its buffers and parameters)."""
        import torchslim
        from torchslim.nn import CodebookLinear

        if not self.cfg.deploy_sparse or not any(isinstance(m, CodebookLinear) for m in final.modules()):
            return None
        deployed = torchslim.deploy(final)
        forms = sorted({type(m).__name__ for m in deployed.modules() if type(m).__name__.startswith("Deployed")
                        and type(m).__name__ != "DeployedSequential"})
        weight_bytes = deployed_weight_bytes(deployed)
        row = self.measure(name, deployed, f"{self.stages[-1]['name']} file, deployed ({', '.join(forms)}; "
                                           f"{weight_bytes} B of weights running)", stored=final)
        row["weight_bytes"] = weight_bytes
        row["deploy_forms"] = forms
        return deployed

    # -- outputs ---------------------------------------------------------------------
    def _write_outputs(self, final: nn.Module, elapsed: float, deploy: nn.Module | None = None) -> dict:
        import torchslim

        cfg = self.cfg
        model_path = self.out / MODEL_FILE
        torchslim.save(final.cpu() if self.device.type != "cpu" else final, model_path)
        final.to(self.device)
        reloaded = torchslim.load(model_path, device=self.device)
        if deploy is not None:  # the deploy row's model, built from the file
            reloaded = torchslim.load(model_path, device=self.device, deploy=True)
        reload_ok = self._accuracy(reloaded) == self.stages[-1]["accuracy"]
        if not reload_ok:  # pragma: no cover - io round trips are tested
            self.log("warning: the reloaded model's accuracy differs from the saved one's")
        dense = self.stages[0]
        last = self.stages[-1]
        summary = {
            "final_stage": last["name"],
            "accuracy_drop_points": 100 * (dense["accuracy"] - last["accuracy"]),
            "compression_ratio": last["compression_ratio"],
            "speedup_b1": (dense["latency_b1_ms"] / last["latency_b1_ms"]) if cfg.latency else None,
            "speedup_b256": (dense["latency_b256_ms"] / last["latency_b256_ms"]) if cfg.latency else None,
            "reload_matches": reload_ok,
            "elapsed_s": elapsed,
        }
        config = asdict(cfg)
        config["hidden"] = list(cfg.hidden)
        config["student_hidden"] = list(cfg.student_hidden) if cfg.student_hidden else None
        payload = {
            "stages": self.stages,
            "summary": summary,
            "data": {"name": self.split.name, "train": len(self.split.y_train), "test": len(self.split.y_test),
                     "features": self.split.num_features, "classes": self.num_classes},
            "config": config,
            "model_file": MODEL_FILE,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        (self.out / "report.json").write_text(json.dumps(payload, indent=2))
        table = format_table(self.stages)
        md = [f"# torchslim run: {self.split.name}", "",
              f"{len(self.split.y_train)} training / {len(self.split.y_test)} test samples, "
              f"{self.split.num_features} features, {self.num_classes} classes; seed {cfg.seed}; device {cfg.device}, "
              f"{torch.get_num_threads()} threads; {elapsed:.1f} s.", "",
              table, "",
              f"Final model ({last['name']}, saved as `{MODEL_FILE}`): {last['compression_ratio']:.1f}x smaller than "
              f"the dense fp32 model, accuracy {100 * last['accuracy']:.2f}% vs {100 * dense['accuracy']:.2f}% "
              f"({summary['accuracy_drop_points']:.2f} points lost)."]
        if cfg.latency:
            md.append(f"Latency vs dense: {summary['speedup_b1']:.2f}x at batch 1, {summary['speedup_b256']:.2f}x at "
                      f"batch 256.")
        plots = self._plots() if cfg.plots else []
        if plots:
            md += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
        (self.out / "report.md").write_text("\n".join(md) + "\n")
        if cfg.verbose:
            print()
            print(table)
            print()
            print(md[6])
            if cfg.latency:
                print(md[7])
            print(f"wrote {self.out}/report.md, report.json, {MODEL_FILE}"
                  + (", " + ", ".join(p.name for p in plots) if plots else ""))
        payload["plots"] = [str(p) for p in plots]
        payload["out"] = str(self.out)
        return payload

    def _plots(self) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        paths = []
        # 1. accuracy vs compressed size
        fig, ax = plt.subplots(figsize=(6, 4))
        chains = {}
        for s in self.stages:  # the dense network's chain and the student's chain
            chains.setdefault("student" if s["name"].startswith("student") else "network", []).append(s)
        for i, (label, chain) in enumerate(chains.items()):
            xs = [s["bytes"] / 1024 for s in chain]
            ys = [100 * s["accuracy"] for s in chain]
            ax.plot(xs, ys, "o-", color=f"C{i}", label=label)
            names = {}  # stages at the same point (shared and deploy: one file) share one label
            for s, x, y in zip(chain, xs, ys):
                names.setdefault((x, y), []).append(s["name"])
            for (x, y), at_point in names.items():
                ax.annotate(" = ".join(at_point), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if len(chains) > 1:
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("saved model size (KiB, log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Accuracy vs compressed size")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        p = self.out / "accuracy_vs_size.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)

        # 2. per-layer sparsity of every stage
        fig, ax = plt.subplots(figsize=(6, 4))
        names = [s["name"] for s in self.stages]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            layers = compressed_layers(self.models[name])
            sp = [100 * float((layer_weight(m) == 0).float().mean()) for _, m in layers]
            ax.bar([j + i * width for j in range(len(sp))], sp, width=width, label=name)
        max_layers = max(len(compressed_layers(self.models[n])) for n in names)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(max_layers)])
        ax.set_xticklabels([f"layer {j + 1}" for j in range(max_layers)])
        ax.set_ylabel("zero weights (%)")
        ax.set_ylim(0, 100)
        ax.set_title("Per-layer sparsity")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = self.out / "layer_sparsity.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)

        # 3. per-layer histogram of the non-zero weights before sharing, with the centroids
        #    of that layer's codebook after centroid fine-tuning
        source = self.pre_share_models[0] if self.pre_share_models else self.models[self.stages[0]["name"]]
        shared_name = next((s["name"] for s in self.stages if s["name"].endswith("shared")), None)
        src_layers = compressed_layers(source)
        shared_layers = compressed_layers(self.models[shared_name]) if shared_name else []
        n = len(src_layers)
        fig, axes = plt.subplots(n, 1, figsize=(6, 1.8 + 1.6 * n), squeeze=False)
        for i, (name, layer) in enumerate(src_layers):
            ax = axes[i][0]
            w = layer_weight(layer).reshape(-1)
            w = w[w != 0]
            ax.hist(w.numpy(), bins=100, color="tab:gray", alpha=0.85, label="non-zero weights")
            if i < len(shared_layers) and hasattr(shared_layers[i][1], "codebook"):
                for j, c in enumerate(shared_layers[i][1].codebook.detach().cpu().tolist()):
                    ax.axvline(c, color="tab:red", lw=0.8, alpha=0.8, label="centroids" if j == 0 else None)
            ax.set_ylabel(f"layer {i + 1}\ncount", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.legend(fontsize=7)
        axes[-1][0].set_xlabel("weight value")
        fig.suptitle("Weights and codebook centroids" if shared_name else "Weight histogram", fontsize=10)
        fig.tight_layout()
        p = self.out / "weight_histogram.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
        return paths


def format_table(stages: list[dict]) -> str:
    """Markdown table of the stages."""
    def ms(v):
        return "n/a" if v is None else f"{v:.3f}"

    head = "| stage | accuracy | params | non-zeros | bytes | compression | batch-1 ms | batch-256 ms |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in stages:
        acc = "n/a" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
        lines.append(f"| {s['name']} | {acc} | {s['params']:,} | {s['nonzeros']:,} | {s['bytes']:,} | "
                     f"{s['compression_ratio']:.1f}x | {ms(s['latency_b1_ms'])} | {ms(s['latency_b256_ms'])} |")
    return "\n".join(lines)


def run_pipeline(config: PipelineConfig | None = None, **overrides) -> dict:
    """Run the pipeline; returns the report.json payload (plus ``plots`` and ``out``)."""
    import dataclasses

    cfg = dataclasses.replace(config or PipelineConfig(), **overrides)
    return Pipeline(cfg).run()
