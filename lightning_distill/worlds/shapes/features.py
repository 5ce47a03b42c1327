"""The shapes world's feature network: a small CNN trained on the world's attributes (``features: shapes``).

It gives whole-image features, an 8×8 map of patch features and attribute logits, the inputs of the metrics in
:mod:`lightning_distill.eval.metrics`. The shipped weights (``assets/tiny/features.safetensors``) are made by
``python -m lightning_distill.worlds.shapes.train_features``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_distill.config.registry import FEATURES
from lightning_distill.errors import UserError
from lightning_distill.eval.metrics import Described
from lightning_distill.worlds.shapes.world import COLORS, KINDS, POSITIONS, SIZES


ATTRIBUTES = (len(COLORS), len(KINDS), len(POSITIONS), len(SIZES))


DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "assets" / "tiny" / "features.safetensors"


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
    def describe(self, images: Tensor, attributes: Tensor | None = None, mentioned: Tensor | None = None) -> Described:
        """``images`` ``[N, 3, 32, 32]`` in [0, 1]; the scenes' ``attributes`` and which the captions name."""
        device = next(self.parameters()).device
        whole, patch, predicted = [], [], []
        for chunk in images.split(self.config.batch_size):
            w, local, logits = self.net(chunk.to(device).float() * 2 - 1)
            whole.append(w.double().cpu())
            patch.append(local.permute(0, 2, 3, 1).flatten(0, 2).double().cpu())
            predicted.append(torch.stack([lg.argmax(-1) for lg in logits], dim=1).cpu())
        return Described(torch.cat(whole), torch.cat(patch), torch.cat(predicted), attributes, mentioned, images.cpu())


def train_classifier(steps: int = 400, batch_size: int = 128, seed: int = 0, log_every: int = 100) -> ShapesNet:
    """Train :class:`ShapesNet` on every scene of the world (held-out pairs included: it is the judge)."""
    from torch.utils.data import DataLoader

    from lightning_distill.worlds.shapes.world import Shapes

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
