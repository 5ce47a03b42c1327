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

from ..diffusion import NoiseScheduleConfig
from ..errors import UserError
from ..registry import BACKBONES, CODECS, TEACHERS
from .teacher import SamplerTeacher

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Dtype = Literal["float32", "bfloat16", "float16"]


def _load(cls: Any, pretrained: str, subfolder: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with a clear error for a missing folder or an unreachable hub id."""
    local = Path(pretrained).expanduser()
    looks_local = local.exists() or pretrained.startswith((".", "/", "~"))
    if looks_local and not (local / subfolder).is_dir():
        raise UserError(f"{cls.__name__}: no folder {local / subfolder} (pretrained={pretrained!r}, subfolder={subfolder!r})")
    try:
        return cls.from_pretrained(str(local) if looks_local else pretrained, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load {cls.__name__} from {pretrained!r}/{subfolder}: {err}") from err


def scheduler_schedule(pretrained: str, subfolder: str = "scheduler") -> tuple[NoiseScheduleConfig, str] | None:
    """The noise schedule and prediction type in a pipeline's scheduler config (local folder or hub id), if any."""
    from diffusers import DDPMScheduler

    try:
        c = DDPMScheduler.load_config(pretrained, subfolder=subfolder)
    except (OSError, ValueError):
        return None
    if c.get("rescale_betas_zero_snr") or c.get("trained_betas") is not None:
        raise UserError(
            f"{pretrained}/{subfolder}: rescale_betas_zero_snr and trained_betas are not supported; "
            "set method.teacher.noise_schedule explicitly"
        )
    return (
        NoiseScheduleConfig(
            num_train_timesteps=c.get("num_train_timesteps", 1000),
            beta_start=c.get("beta_start", 0.00085),
            beta_end=c.get("beta_end", 0.012),
            beta_schedule=c.get("beta_schedule", "scaled_linear"),
        ),
        c.get("prediction_type", "epsilon"),
    )


class UNetDenoiser(nn.Module):
    """``denoiser(x, t, cond)`` over a diffusers ``UNet2DConditionModel``.

    ``cond`` holds ``text`` (``encoder_hidden_states``) and, for SDXL, ``pooled`` (``text_embeds``) and
    ``time_ids`` (original size, crop top-left, target size).
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        added = None
        if getattr(self.unet.config, "addition_embed_type", None) == "text_time":
            added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        dtype = self.unet.dtype
        out = self.unet(
            x.to(dtype), t, encoder_hidden_states=cond["text"].to(dtype), added_cond_kwargs=added, return_dict=False
        )[0]
        return out.to(x.dtype)

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
    class Config:
        pretrained: str
        """Local pipeline folder or hub id, e.g. stabilityai/stable-diffusion-xl-base-1.0."""
        subfolder: str = "unet"
        variant: str | None = None
        """e.g. fp16, for ``diffusion_pytorch_model.fp16.safetensors``."""
        dtype: Dtype = "float32"
        """Weights of the frozen teacher (bfloat16 halves its memory)."""
        prediction: Literal["epsilon", "sample", "v_prediction"] | None = None
        """None: the scheduler config's prediction_type (epsilon for SDXL)."""
        noise_schedule: NoiseScheduleConfig | None = None
        """None: the scheduler config's betas, else SDXL's."""

    def __init__(self, config: Config, *, seed: int = 0, empty: bool = False) -> None:
        from diffusers import UNet2DConditionModel

        if empty:  # the architecture alone, on the meta device (the caller's context): no weights read
            unet_config = UNet2DConditionModel.load_config(config.pretrained, subfolder=config.subfolder)
            unet = UNet2DConditionModel.from_config(unet_config).to(DTYPES[config.dtype])
        else:
            unet = _load(
                UNet2DConditionModel, config.pretrained, config.subfolder, variant=config.variant,
                torch_dtype=DTYPES[config.dtype],
            )
        found = scheduler_schedule(config.pretrained)
        schedule = config.noise_schedule or (found[0] if found else NoiseScheduleConfig())
        prediction = config.prediction or (found[1] if found else "epsilon")
        super().__init__(UNetDenoiser(unet), prediction=prediction, noise_schedule=schedule)


@TEACHERS.register("unet")
class UNetTeacher(SDXLTeacher):
    """Any diffusers ``UNet2DConditionModel`` folder (``unet/`` and ``scheduler/``), e.g. the tiny world's teacher;
    the same loading code and sampler as ``sdxl``."""


@BACKBONES.register("unet_encoder")
class UNetEncoder(nn.Module):
    """A trainable copy of the teacher UNet's conv_in, time and added embeddings, down blocks and mid block.

    ``forward(x, t, cond)`` returns the mid block's features (``block_out_channels[-1]`` channels at 1/2^(levels-1)
    of the latent size), text- and time-conditioned exactly as in the UNet.
    """

    @dataclass(kw_only=True)
    class Config:
        dtype: Dtype = "float32"
        gradient_checkpointing: bool = False
        """Recompute each block's activations in the backward pass (less memory, about a third more compute)."""

    def __init__(self, config: Config, *, teacher: SamplerTeacher) -> None:
        super().__init__()
        self.checkpointing = config.gradient_checkpointing
        denoiser = teacher.denoiser
        if not isinstance(denoiser, UNetDenoiser):
            raise UserError(f"backbone 'unet_encoder' needs a diffusers UNet teacher, got {type(denoiser).__name__}")
        unet = denoiser.unet
        self.unet_config = unet.config
        for name in ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "down_blocks", "mid_block"):
            part = getattr(unet, name, None)
            setattr(self, name, copy.deepcopy(part) if part is not None else None)
        self.to(DTYPES[config.dtype]).requires_grad_(True).train()
        self.out_channels = unet.config.block_out_channels[-1]

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        dtype = self.conv_in.weight.dtype
        x = x.to(dtype)
        text = cond["text"].to(dtype)
        emb = self.time_embedding(self.time_proj(t.expand(x.shape[0])).to(dtype))
        if self.add_embedding is not None and self.unet_config.addition_embed_type == "text_time":
            time_embeds = self.add_time_proj(cond["time_ids"].flatten()).reshape(x.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([cond["pooled"], time_embeds], dim=-1).to(dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = self._run(self._down, block, h, emb, text)
        return self._run(self._mid, self.mid_block, h, emb, text)

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
        return [*self.down_blocks, self.mid_block]


@CODECS.register("sdxl")
class SDXLCodec(nn.Module):
    """SDXL's VAE (pixels <-> latents, scaled by ``scaling_factor``) and its two CLIP text encoders.

    ``encode_text(captions, time_ids)`` follows SDXL: the penultimate hidden states of both encoders
    concatenated on channels (``text``), the second encoder's projected pooled output (``pooled``), and the
    micro-conditioning ``time_ids``. Empty captions give zero embeddings (``force_zeros_for_empty_prompt``).
    """

    @dataclass(kw_only=True)
    class Config:
        pretrained: str
        vae_subfolder: str = "vae"
        vae_dtype: Dtype = "float32"
        """SDXL's VAE overflows in float16; float32 (or bfloat16) is safe."""
        text_dtype: Dtype = "float32"
        sample_latents: bool = False
        """Sample the VAE posterior instead of taking its mean."""
        text_encoders: bool = True
        """Load the text encoders (not needed when the data already holds embeddings)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        self.config = config
        self.vae = _load(AutoencoderKL, config.pretrained, config.vae_subfolder, torch_dtype=DTYPES[config.vae_dtype])
        self.scaling = float(self.vae.config.scaling_factor)
        self.scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        """Pixels per latent (8 for SDXL's VAE)."""
        self.text_encoder = self.text_encoder_2 = None
        if config.text_encoders:
            from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

            dtype = DTYPES[config.text_dtype]
            self.tokenizer = _load(CLIPTokenizer, config.pretrained, "tokenizer")
            self.tokenizer_2 = _load(CLIPTokenizer, config.pretrained, "tokenizer_2")
            self.text_encoder = _load(CLIPTextModel, config.pretrained, "text_encoder", torch_dtype=dtype)
            self.text_encoder_2 = _load(CLIPTextModelWithProjection, config.pretrained, "text_encoder_2", torch_dtype=dtype)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.sample() if self.config.sample_latents else posterior.mean
        return (latents * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode((latents / self.scaling).to(self.vae.dtype)).sample.float()

    @torch.no_grad()
    def encode_text(self, captions: list[str], time_ids: Tensor) -> dict[str, Tensor]:
        if self.text_encoder is None:
            raise UserError("codec sdxl: captions need the text encoders; set codec.text_encoders: true")
        device = next(self.text_encoder.parameters()).device
        states, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(
                list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the projected pooled output of the second encoder (text_embeds)
        text = torch.cat(states, dim=-1).float()
        pooled_t = pooled.float()  # type: ignore[union-attr]
        empty = torch.tensor([not c for c in captions], device=device)
        text = torch.where(empty[:, None, None], torch.zeros_like(text), text)
        pooled_t = torch.where(empty[:, None], torch.zeros_like(pooled_t), pooled_t)
        return {"text": text, "pooled": pooled_t, "time_ids": time_ids.to(device).float()}


def default_time_ids(height: int, width: int, batch: int, device: Any = None) -> Tensor:
    """SDXL micro-conditioning for uncropped square training: original = target = image size, crop (0, 0)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device).repeat(batch, 1)


