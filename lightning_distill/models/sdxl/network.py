"""SDXL through diffusers and transformers: the UNet as teacher and discriminator backbone, VAE and both CLIP text
encoders as the codec. Everything loads with ``from_pretrained`` from a local folder or a hub id laid out like
``stabilityai/stable-diffusion-xl-base-1.0`` (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
``tokenizer/``, ``tokenizer_2/``, ``scheduler/``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_distill.models.noise import NoiseSchedule, Schedule, schedule_from_pretrained
from lightning_distill.errors import UserError
from lightning_distill.models.adapters import UNET_LORA_EXCLUDE
from lightning_distill.config.registry import BACKBONES, TEACHERS
from lightning_distill.models.teacher import lightning_scheduler  # noqa: F401  (re-exported)
from lightning_distill.models.teacher import PretrainedSource, PretrainedTeacherConfig, SamplerTeacher, load_network
from lightning_distill.utils.tensors import DTYPES, Dtype

class UNetDenoiser(nn.Module):
    """``denoiser(x, t, cond)`` over a diffusers ``UNet2DConditionModel``.

    ``cond`` holds ``text`` (``encoder_hidden_states``) and, for SDXL, ``pooled`` (``text_embeds``) and
    ``time_ids`` (original size, crop top-left, target size).
    """

    def __init__(self, unet: nn.Module, schedule: Schedule | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        """Gives the network's time for our integer timesteps (None: the timestep itself, as for betas)."""

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        added = None
        if getattr(self.unet.config, "addition_embed_type", None) == "text_time":
            added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        dtype = self.unet.dtype
        time = self.schedule.model_time(t, x) if self.schedule is not None else t
        out = self.unet(
            x.to(dtype), time, encoder_hidden_states=cond["text"].to(dtype), added_cond_kwargs=added, return_dict=False
        )[0]
        return out.to(x.dtype)

    lora_exclude = UNET_LORA_EXCLUDE

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def network(self) -> nn.Module:
        """The diffusers network, as ``export`` saves it."""
        return self.unet

    def fsdp_units(self) -> list[nn.Module]:
        u = self.unet
        return [*u.down_blocks, u.mid_block, *u.up_blocks]

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()


@TEACHERS.register("sdxl")
class SDXLTeacher(SamplerTeacher):
    """A frozen diffusers UNet (SDXL or any ``UNet2DConditionModel``) with the DDIM/Euler sampler and CFG.

    The noise schedule and prediction type come from the folder's ``scheduler/`` config when it has one.
    """

    @dataclass(kw_only=True)
    class Config(PretrainedTeacherConfig):
        prediction: Literal["epsilon", "sample", "v_prediction"] | None = None
        """None: the scheduler config's prediction_type (epsilon for SDXL)."""

    def __init__(self, config: Config, *, seed: int = 0, empty: bool = False) -> None:
        from diffusers import UNet2DConditionModel

        unet = load_network(UNet2DConditionModel, config, empty)
        found = schedule_from_pretrained(config.pretrained)
        schedule = config.noise_schedule.build() if config.noise_schedule else (found[0] if found else NoiseSchedule())
        prediction = config.prediction or (found[1] if found else "epsilon")
        super().__init__(UNetDenoiser(unet, schedule), prediction=prediction, schedule=schedule)
        self.source = PretrainedSource(config.pretrained, config.subfolder, config.variant, config.dtype)
        sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        self.pipeline_class = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"

    def sampling_scheduler(self, prediction: str) -> Any:
        """Euler with trailing spacing and the student's prediction type, on the folder's schedule (SDXL's when
        the folder has no ``scheduler/``): how the Lightning models sample."""
        from diffusers import EulerDiscreteScheduler

        folder = Path(self.source.pretrained).expanduser() / "scheduler"
        base = EulerDiscreteScheduler.from_pretrained(str(folder)) if folder.is_dir() else EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
        )
        return lightning_scheduler(base.config, prediction)


@TEACHERS.register("unet")
class UNetTeacher(SDXLTeacher):
    """Any diffusers ``UNet2DConditionModel`` folder (``unet/`` and ``scheduler/``), e.g. the tiny world's teacher;
    the same loading code and sampler as ``sdxl``."""


@BACKBONES.register("unet_encoder")
class UNetEncoder(nn.Module):
    """A trainable copy of the teacher UNet's conv_in, time and added embeddings, down blocks and mid block, or
    (``frozen: true``, LADD-style, arXiv 2403.12015) the frozen teacher's own, referenced rather than copied:
    then nothing of the backbone trains or is saved, only the head (the memory of a 1.3 B-parameter copy, its
    gradients and Adam state at SDXL size), while gradients still reach the generated latents.

    ``forward(x, t, cond)`` returns the mid block's features (``block_out_channels[-1]`` channels at 1/2^(levels-1)
    of the latent size), text- and time-conditioned exactly as in the UNet.
    """

    PARTS = ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "down_blocks", "mid_block")

    @dataclass(kw_only=True)
    class Config:
        dtype: Dtype = "float32"
        gradient_checkpointing: bool = False
        """Recompute each block's activations in the backward pass (less memory, about a third more compute)."""
        frozen: bool = False
        """Use the frozen teacher's encoder itself (its weights must be whole on each device: one device or DDP)."""
        levels: list[int] | None = None
        """For multi-level discriminators: the feature maps ``features`` returns, after down block 1 to n
        (counted from 1) and n + 1 for the mid block. None: every down block's and the mid block's."""

    def __init__(self, config: Config, *, teacher: SamplerTeacher) -> None:
        super().__init__()
        self.checkpointing = config.gradient_checkpointing
        denoiser = teacher.denoiser
        if not isinstance(denoiser, UNetDenoiser):
            raise UserError(f"backbone 'unet_encoder' needs a diffusers UNet teacher, got {type(denoiser).__name__}")
        unet = denoiser.unet
        self.unet_config = unet.config
        self.schedule = teacher.schedule
        self.frozen = config.frozen
        self.out_channels = unet.config.block_out_channels[-1]
        n = len(unet.config.block_out_channels)
        self.levels = sorted(set(config.levels)) if config.levels else list(range(1, n + 2))
        if any(not 1 <= lv <= n + 1 for lv in self.levels):
            raise UserError(f"method.discriminator.backbone.levels: each in 1 to {n + 1} (the UNet has {n} down blocks, "
                            f"then the mid block), got {config.levels}")
        self.level_channels = [unet.config.block_out_channels[min(lv, n) - 1] for lv in self.levels]
        """Channels of each map ``features`` returns."""
        c = unet.config
        self.conditioning_dims = {"text": int(c.cross_attention_dim)}
        """Conditioning entries (and widths) a multi-level discriminator's heads may read."""
        if c.addition_embed_type == "text_time":  # SDXL: pooled text beside six time ids
            self.conditioning_dims["pooled"] = int(c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim)
        if config.frozen:  # held outside the module tree: not in this module's parameters or state dict
            self._teacher_unet = (unet,)
            return
        for name in self.PARTS:
            part = getattr(unet, name, None)
            setattr(self, name, copy.deepcopy(part) if part is not None else None)
        self.to(DTYPES[config.dtype]).requires_grad_(True).train()

    def __getattr__(self, name: str) -> Any:
        if name in UNetEncoder.PARTS and self.__dict__.get("frozen"):
            return getattr(self.__dict__["_teacher_unet"][0], name, None)  # parts a UNet may lack: None, as copied
        return super().__getattr__(name)

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self._encode(x, t, cond, [])[0]

    def features(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> list[Tensor]:
        """The feature maps after each of ``levels`` (the encoder's resolutions, then the mid block)."""
        mid, maps = self._encode(x, t, cond, self.levels)
        return maps + ([mid] if len(self.down_blocks) + 1 in self.levels else [])

    def _encode(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], levels: list[int]) -> tuple[Tensor, list[Tensor]]:
        dtype = self.conv_in.weight.dtype
        x = x.to(dtype)
        text = cond["text"].to(dtype)
        time = self.schedule.model_time(t, x)
        emb = self.time_embedding(self.time_proj(time.expand(x.shape[0])).to(dtype))
        if self.add_embedding is not None and self.unet_config.addition_embed_type == "text_time":
            time_embeds = self.add_time_proj(cond["time_ids"].flatten()).reshape(x.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([cond["pooled"], time_embeds], dim=-1).to(dtype))
        h = self.conv_in(x)
        maps = []
        for i, block in enumerate(self.down_blocks, start=1):
            h = self._run(self._down, block, h, emb, text)
            if i in levels:
                maps.append(h)
        return self._run(self._mid, self.mid_block, h, emb, text), maps

    def _run(self, fn: Any, block: nn.Module, h: Tensor, emb: Tensor, text: Tensor) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, block, h, emb, text, use_reentrant=False)
        return fn(block, h, emb, text)

    @staticmethod
    def _down(block: nn.Module, h: Tensor, emb: Tensor, text: Tensor) -> Tensor:
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=emb, encoder_hidden_states=text)[0]
        return block(hidden_states=h, temb=emb)[0]

    @staticmethod
    def _mid(block: nn.Module, h: Tensor, emb: Tensor, text: Tensor) -> Tensor:
        if getattr(block, "has_cross_attention", False):
            return block(h, emb, encoder_hidden_states=text)
        return block(h, emb)

    def fsdp_units(self) -> list[nn.Module]:
        return [] if self.frozen else [*self.down_blocks, self.mid_block]


