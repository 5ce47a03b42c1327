"""Evaluation on the tiny shapes world: a small classifier trained on the world gives the features.

- ``fd``: Fréchet distance between Gaussian fits of whole-image features (the penultimate layer), samples
  against real images of the same prompts; the world's FID.
- ``fd_patch``: the same on patch features: the classifier's 8×8 feature map, each position a descriptor of an
  about 11-pixel patch. Like the paper's FID-Patch it looks at local detail (edges, flat colour, noise), so blur
  that whole-image features forgive shows here.
- ``adherence``: the fraction of the caption's attributes (colour, kind, position, size) that the classifier
  reads back from the sample; real images score about 1.
- ``teacher_distance``: RMS pixel distance to the teacher's sample from the same noise and prompt (how well
  the probability flow is kept).
- ``coverage``: of the teacher's samples, the fraction whose k-nearest-neighbour ball (in whole features) holds
  at least one of the model's samples (Naeem et al., 2020): mode coverage against the teacher.

The classifier ships in the package (``assets/tiny/features.safetensors``, about 0.3 MB) and is made by
``python -m lightning_distill.train_features --out lightning_distill/assets/tiny/features.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import UserError
from ..registry import FEATURES, METRICS
from .shapes import COLORS, KINDS, POSITIONS, SIZES

ATTRIBUTES = (len(COLORS), len(KINDS), len(POSITIONS), len(SIZES))
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "tiny" / "features.safetensors"


@dataclass
class Described:
    """What the feature network says about a set of images (all on the CPU, float64 features)."""

    whole: Tensor
    """``[N, D]`` whole-image features."""
    patch: Tensor
    """``[N * P, D']`` patch features."""
    predicted: Tensor
    """``[N, 4]`` attribute classes read from the images."""
    attributes: Tensor | None = None
    """``[N, 4]`` the attributes the captions asked for."""
    images: Tensor | None = None
    """``[N, 3, H, W]`` the images themselves, in [0, 1]."""


class ShapesNet(nn.Module):
    """A small CNN over 32-pixel images in [-1, 1]: four stride-2 conv blocks, a 64-d embedding, four heads."""

    def __init__(self, width: int = 32, dim: int = 64) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8, o), nn.SiLU())

        self.stem = nn.Sequential(block(3, width, 1), block(width, width, 2), block(width, 2 * width, 2))  # 8×8
        self.tail = nn.Sequential(block(2 * width, 2 * width, 2), nn.Flatten(), nn.Linear(2 * width * 16, dim))
        self.heads = nn.ModuleList(nn.Linear(dim, n) for n in ATTRIBUTES)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        local = self.stem(images)
        whole = self.tail(local)
        return whole, local, [head(F.silu(whole)) for head in self.heads]


@FEATURES.register("shapes")
class ShapesFeatures(nn.Module):
    """The shipped shapes-world classifier as a frozen feature network."""

    @dataclass(kw_only=True)
    class Config:
        weights: str | None = None
        """A safetensors file made by ``python -m lightning_distill.train_features``; None: the shipped one."""
        batch_size: int = 256

    def __init__(self, config: Config) -> None:
        super().__init__()
        from safetensors.torch import load_file

        self.config = config
        path = Path(config.weights) if config.weights else DEFAULT_WEIGHTS
        if not path.is_file():
            raise UserError(f"features shapes: no weights at {path}; make them with "
                            f"python -m lightning_distill.train_features --out {path}")
        self.net = ShapesNet()
        self.net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def describe(self, images: Tensor, attributes: Tensor | None = None) -> Described:
        """``images`` ``[N, 3, 32, 32]`` in [0, 1]."""
        device = next(self.parameters()).device
        whole, patch, predicted = [], [], []
        for chunk in images.split(self.config.batch_size):
            w, local, logits = self.net(chunk.to(device).float() * 2 - 1)
            whole.append(w.double().cpu())
            patch.append(local.permute(0, 2, 3, 1).flatten(0, 2).double().cpu())
            predicted.append(torch.stack([lg.argmax(-1) for lg in logits], dim=1).cpu())
        return Described(torch.cat(whole), torch.cat(patch), torch.cat(predicted), attributes, images.cpu())


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """``|μa - μb|² + tr(Σa + Σb - 2 (Σa^½ Σb Σa^½)^½)`` between Gaussian fits of the rows of ``a`` and ``b``."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    distance = float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle)
    return max(0.0, distance)  # rounding can leave a tiny negative number for identical sets


def coverage(real: Tensor, fake: Tensor, k: int = 5) -> float:
    """Fraction of ``real`` rows whose k-NN radius (among ``real``) contains at least one ``fake`` row."""
    real, fake = real.double(), fake.double()
    radius = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # the point itself is its first neighbour
    return float((torch.cdist(real, fake).min(dim=1).values < radius).double().mean())


def _subsample(x: Tensor, n: int) -> Tensor:
    if x.shape[0] <= n:
        return x
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n]]


class Metric:
    """Base of the registered metrics: ``metric(samples, real, teacher) -> float``; settings in ``Config``."""

    @dataclass(kw_only=True)
    class Config:
        pass

    def __init__(self, config: Any) -> None:
        self.config = config

    def __call__(self, samples: Described, real: Described, teacher: Described | None = None) -> float:
        raise NotImplementedError


@METRICS.register("fd")
class WholeFD(Metric):
    """Fréchet distance of whole-image features, samples against real images."""

    def __call__(self, samples: Described, real: Described, teacher: Described | None = None) -> float:
        return frechet_distance(samples.whole, real.whole)


@METRICS.register("fd_patch")
class PatchFD(Metric):
    """Fréchet distance of patch features (each position of the classifier's 8×8 map), samples against real."""

    @dataclass(kw_only=True)
    class Config:
        max_patches: int = 20_000
        """Patches drawn from each set (a fixed subset), to bound the cost."""

    def __call__(self, samples: Described, real: Described, teacher: Described | None = None) -> float:
        n = self.config.max_patches
        return frechet_distance(_subsample(samples.patch, n), _subsample(real.patch, n))


@METRICS.register("adherence")
class Adherence(Metric):
    """Fraction of the prompts' attributes (colour, kind, position, size) that the classifier finds."""

    def __call__(self, samples: Described, real: Described, teacher: Described | None = None) -> float:
        if samples.attributes is None:
            raise UserError("metric adherence needs the prompts' attributes (data with an 'attributes' entry)")
        return float((samples.predicted == samples.attributes).double().mean())


@METRICS.register("coverage")
class Coverage(Metric):
    """Mode coverage against the teacher's samples (k-NN balls in whole-image features); 1 for the teacher."""

    @dataclass(kw_only=True)
    class Config:
        k: int = 5

    def __call__(self, samples: Described, real: Described, teacher: Described | None = None) -> float:
        reference = teacher if teacher is not None else real
        return coverage(reference.whole, samples.whole, self.config.k)


@METRICS.register("teacher_distance")
class TeacherDistance(Metric):
    """Root-mean-square pixel distance (in [0, 1] units) between each sample and the teacher's sample from the
    same noise and prompt: how closely a student keeps the teacher's probability flow (0 for the teacher)."""

    def __call__(self, samples: Described, real: Described, teacher: Described | None = None) -> float:
        if teacher is None or teacher.images is None or samples.images is None:
            raise UserError("metric teacher_distance needs the teacher's samples")
        return float((samples.images.double() - teacher.images.double()).square().mean().sqrt())


def train_classifier(steps: int = 400, batch_size: int = 128, seed: int = 0, log_every: int = 100) -> ShapesNet:
    """Train :class:`ShapesNet` on every scene of the world (held-out pairs included: it is the judge)."""
    from torch.utils.data import DataLoader

    from .shapes import Shapes

    torch.manual_seed(seed)
    data = Shapes(Shapes.Config(size=steps * batch_size, split="all"), seed=seed + 12345)
    loader = DataLoader(data, batch_size=batch_size, num_workers=0)
    net = ShapesNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step, batch in enumerate(loader):
        images = batch["pixels"]
        # a little noise, so that slightly imperfect samples are still read by attribute
        images = images + 0.05 * torch.rand(len(images), 1, 1, 1) * torch.randn_like(images)
        _, _, logits = net(images)
        loss = sum(F.cross_entropy(lg, batch["attributes"][:, i]) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0:
            acc = torch.stack([lg.argmax(-1) == batch["attributes"][:, i] for i, lg in enumerate(logits)], 1)
            print(f"step {step + 1}/{steps}  loss {float(loss.detach()):.4f}  attribute accuracy {float(acc.float().mean()):.4f}", flush=True)
    return net.eval()
