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
from typing import Any

import torch
from torch import Tensor

from lightning_distill.errors import UserError
from lightning_distill.config.registry import METRICS


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
    """``[N, 4]`` the attributes of the scenes the captions describe."""
    mentioned: Tensor | None = None
    """``[N, 4]`` which of them each caption names (None: all)."""
    images: Tensor | None = None
    """``[N, 3, H, W]`` the images themselves, in [0, 1]."""
    groups: Tensor | None = None
    """``[N]`` which prompt each image was sampled for, when there are several samples per prompt."""


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


@METRICS.register("fd_teacher")
class TeacherFD(Metric):
    """Fréchet distance of whole-image features against the teacher's samples (FID-T): how close a student's
    distribution is to its teacher's, whatever the teacher's own distance to real images."""

    def __call__(self, samples: Described, real: Described, teacher: Described | None = None) -> float:
        if teacher is None:
            raise UserError("metric fd_teacher needs the teacher's samples")
        return frechet_distance(samples.whole, teacher.whole)


@METRICS.register("fd_patch_teacher")
class TeacherPatchFD(PatchFD):
    """Fréchet distance of patch features against the teacher's samples (Patch-FID-T)."""

    def __call__(self, samples: Described, real: Described, teacher: Described | None = None) -> float:
        if teacher is None:
            raise UserError("metric fd_patch_teacher needs the teacher's samples")
        return super().__call__(samples, teacher)


@METRICS.register("adherence")
class Adherence(Metric):
    """Fraction of the attributes the prompts name (colour, kind, position, size) that the classifier finds."""

    def __call__(self, samples: Described, real: Described, teacher: Described | None = None) -> float:
        if samples.attributes is None:
            raise UserError("metric adherence needs the prompts' attributes (data with an 'attributes' entry)")
        hit = samples.predicted == samples.attributes
        if samples.mentioned is None:
            return float(hit.double().mean())
        return float(hit[samples.mentioned].double().mean()) if samples.mentioned.any() else 1.0


def entropy(values: Tensor) -> float:
    """Shannon entropy (nats) of the empirical distribution of integer ``values``."""
    p = torch.bincount(values.long()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


@METRICS.register("diversity")
class Diversity(Metric):
    """How varied the samples are where the prompt leaves an attribute open, relative to real images: per
    attribute, the entropy of the values the classifier reads from samples whose caption does not name it, over
    the entropy of the same scenes' real values; the mean over attributes. About 1 for real images, 0 for a
    model that always draws the same value (mode collapse), lower than 1 for one that averages modes."""

    @dataclass(kw_only=True)
    class Config:
        min_open: int = 8
        """Attributes left open by fewer prompts than this are skipped."""

    def __call__(self, samples: Described, real: Described, teacher: Described | None = None) -> float:
        if samples.mentioned is None or real.attributes is None:
            raise UserError("metric diversity needs captions that leave attributes open (shapes captions: mixed)")
        ratios = []
        for i in range(samples.predicted.shape[1]):
            open_ = ~samples.mentioned[:, i]
            reference = entropy(real.attributes[open_, i]) if int(open_.sum()) >= self.config.min_open else 0.0
            if reference > 0:
                ratios.append(entropy(samples.predicted[open_, i]) / reference)
        if not ratios:
            raise UserError(f"metric diversity: fewer than {self.config.min_open} prompts leave any attribute open")
        return sum(ratios) / len(ratios)


def expected_distinct(probabilities: Tensor, n: int) -> float:
    """Expected number of distinct values among ``n`` independent draws from a categorical distribution."""
    return float((1 - (1 - probabilities.double()) ** n).sum())


def per_prompt_diversity(predicted: Tensor, attributes: Tensor, mentioned: Tensor, pool: Tensor) -> float:
    """Mode coverage per prompt, relative to real scenes of that prompt, averaged over prompts.

    For each prompt ``p`` (``attributes[p]``, ``mentioned[p]``: its scene and which attributes its caption names)
    with ``n`` samples (``predicted[p]``: ``[n, A]`` attribute values read from them) and each attribute ``a`` it
    leaves open: the number of distinct values among the samples over the number expected among ``n`` real scenes
    of the prompt, drawn from ``pool`` (``[N, A]`` real scenes' attributes; the real scenes of a prompt are those
    that agree with it on every named attribute). The mean over the prompt's open attributes, then over prompts.

    About 1 for real scenes of the prompts; ``1 / E[distinct]`` for a model that draws one scene per prompt (mode
    dropping) and likewise for one that averages the modes (every noise lands on the same blurred mean).
    Prompts that name every attribute, or with fewer than 2 real scenes in the pool, are skipped.
    """
    n = predicted.shape[1]
    scores = []
    for p in range(predicted.shape[0]):
        named = mentioned[p].bool()
        if bool(named.all()):
            continue
        agree = (pool[:, named] == attributes[p, named]).all(dim=1)
        if int(agree.sum()) < 2:
            continue
        ratios = []
        for a in torch.nonzero(~named).flatten().tolist():
            counts = torch.bincount(pool[agree, a].long()).double()
            expected = expected_distinct(counts / counts.sum(), n)
            ratios.append(len(set(predicted[p, :, a].tolist())) / expected)
        scores.append(sum(ratios) / len(ratios))
    if not scores:
        raise UserError("metric diversity_per_prompt: no prompt leaves an attribute open (shapes captions: mixed)")
    return sum(scores) / len(scores)


@METRICS.register("diversity_per_prompt")
class PerPromptDiversity(Metric):
    """Per under-specified prompt, several samples from different noises: the share of the values the prompt
    leaves open that appear among them, relative to real scenes of the prompt (:func:`per_prompt_diversity`).
    It sees both mode dropping and mode averaging prompt by prompt, where ``diversity`` pools prompts. Needs the
    report's per-prompt samples (``samples.groups``)."""

    per_prompt = True
    """Scored on the report's per-prompt sample sets (``Described.groups``), not on one sample per prompt."""

    def __call__(self, samples: Described, real: Described, teacher: Described | None = None) -> float:
        if samples.groups is None or samples.attributes is None or samples.mentioned is None or real.attributes is None:
            raise UserError("metric diversity_per_prompt needs several samples per prompt (the report's "
                            "diversity_prompts) and data with 'attributes' and 'mentioned'")
        g = samples.groups
        order = torch.argsort(g, stable=True)
        prompts = int(g.max()) + 1
        predicted = samples.predicted[order].reshape(prompts, -1, samples.predicted.shape[1])
        first = order.reshape(prompts, -1)[:, 0]
        return per_prompt_diversity(predicted, samples.attributes[first], samples.mentioned[first], real.attributes)


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


