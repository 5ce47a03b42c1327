"""Tiny SD1.5-, SD3- and Flux-shaped pipeline folders made from random weights (nothing downloaded).

Each folder has the layout and classes of the real checkpoint (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-3-medium-diffusers, black-forest-labs/FLUX.1-dev) and loads with the real pipeline's
``from_pretrained``; the pipeline runs end to end on a CPU at 32 and 64 px. The VAEs have four blocks, so a latent
is 8 pixels along a side as in the real families. The pipeline object is built from its components and saved
with ``save_pretrained``, so ``model_index.json`` is what diffusers itself writes.

    python tests/helpers/tiny_families.py {sd15,sd3,flux} OUT_DIR
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

import torch
from tiny_sdxl import WORDS, make_tokenizer

CLIP_LENGTH = 16
"""Tokens of the tiny CLIP tokenizers (and positions of their encoders), start and end included."""


def _clip_config(folder: Path, hidden: int, projection: int | None = None):
    """A 2-layer CLIP text config whose vocabulary and special ids are those of the tokenizer in ``folder``."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    vocab = len(CLIPTokenizer.from_pretrained(folder))
    extra = {} if projection is None else {"projection_dim": projection}
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=CLIP_LENGTH, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
        **extra,
    )


def make_t5_tokenizer():
    """A T5 Unigram tokenizer: T5's special ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), the words and letters."""
    from transformers import T5TokenizerFast

    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for piece, score in [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in string.ascii_lowercase + string.digits] + [
        ("▁" + c, -6.0) for c in string.ascii_lowercase + string.digits
    ]:
        scores.setdefault(piece, score)  # "▁a" is a word and a letter: one entry
    # transformers 5's T5TokenizerFast is itself a tokenizers Unigram model built from (piece, score) pairs
    return T5TokenizerFast(vocab=list(scores.items()), extra_ids=0, model_max_length=512)


def make_t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
    ))


def make_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None):
    """A four-block AutoencoderKL (8 pixels per latent); SD3/Flux's VAEs have a shift and no quant convs."""
    from diffusers import AutoencoderKL

    flow = shift_factor is not None
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
        norm_num_groups=32, sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=not flow, use_post_quant_conv=not flow,
    )


def _clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    make_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def make_sd15(out: Path, seed: int = 0) -> Path:
    """SD1.5: an epsilon UNet without added embeddings, one CLIP (hidden 32), a 4-channel VAE, PNDM."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    out = Path(out)
    scratch = out / "_build"
    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer(scratch / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=make_vae(4, 0.18215),
        text_encoder=CLIPTextModel(_clip_config(scratch / "tokenizer", 32)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(
            sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        ),
        scheduler=PNDMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
        ),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _save(pipe, out, scratch)


def make_sd3(out: Path, seed: int = 0) -> Path:
    """SD3: an MMDiT (2 layers, 2 heads of 8), CLIP-L and CLIP-G stand-ins (hidden 8 and 16, projections 32 each),
    T5 (d_model 32 = joint_attention_dim), a 16-channel VAE with shift and scale, flow matching with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    out = Path(out)
    scratch = out / "_build"
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _clip_tokenizer(scratch / "tokenizer"), _clip_tokenizer(scratch / "tokenizer_2")
    tokenizer_3 = make_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=4, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=64,
            pos_embed_max_size=16,
        ),
        # hidden 8 + 16 = 24, zero-padded to T5's 32 (as 768 + 1280 to 4096); pooled 32 + 32 = pooled_projection_dim
        text_encoder=CLIPTextModelWithProjection(_clip_config(scratch / "tokenizer", 8, projection=32)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(scratch / "tokenizer_2", 16, projection=32)),
        text_encoder_3=make_t5(tokenizer_3, 32),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
        vae=make_vae(16, 1.5305, 0.0609),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )
    return _save(pipe, out, scratch)


def make_flux(out: Path, seed: int = 0) -> Path:
    """Flux: one double and one single block (2 heads of 16, RoPE axes 4+6+6), guidance embedding, CLIP (hidden
    32, pooled output only), T5 (d_model 32), a 16-channel VAE with shift and scale, dynamically shifted flow."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    out = Path(out)
    scratch = out / "_build"
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _clip_tokenizer(scratch / "tokenizer"), make_t5_tokenizer()
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        text_encoder=CLIPTextModel(_clip_config(scratch / "tokenizer", 32)),
        text_encoder_2=make_t5(tokenizer_2, 32),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        vae=make_vae(16, 0.3611, 0.1159),
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        ),
    )
    return _save(pipe, out, scratch)


def _save(pipe, out: Path, scratch: Path) -> Path:
    import shutil

    pipe.save_pretrained(out)
    shutil.rmtree(scratch)
    return out


MAKERS = {"sd15": make_sd15, "sd3": make_sd3, "flux": make_flux}

if __name__ == "__main__":
    MAKERS[sys.argv[1]](Path(sys.argv[2]))
