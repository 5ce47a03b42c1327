"""A tiny SDXL-shaped pipeline folder made from random weights (nothing downloaded).

Same layout and classes as stabilityai/stable-diffusion-xl-base-1.0: ``unet/`` (UNet2DConditionModel with
``text_time`` added embeddings), ``text_encoder/`` (CLIPTextModel), ``text_encoder_2/``
(CLIPTextModelWithProjection), ``tokenizer/`` and ``tokenizer_2/`` (CLIP BPE, built here), ``vae/``
(AutoencoderKL), ``scheduler/`` (EulerDiscreteScheduler, SDXL's betas).

    python tests/helpers/tiny_sdxl.py OUT_DIR
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch

WORDS = "a photo of red green blue cat dog square circle on the left right small big and with".split()


def make_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer whose vocabulary is the characters, the words above and the special tokens."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["!", '"'] + list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase + string.digits]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right, recording every merge
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            tokens.append(pieces[0])
    vocab = {}
    for tok in [*tokens, "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(tok, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    tok.save_pretrained(folder)


def make_pipeline(out: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out)
    torch.manual_seed(seed)
    make_tokenizer(out / "tokenizer")
    make_tokenizer(out / "tokenizer_2")
    vocab = len(CLIPTokenizer.from_pretrained(out / "tokenizer"))
    common = dict(vocab_size=vocab, max_position_embeddings=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    CLIPTextModel(CLIPTextConfig(hidden_size=32, **common)).save_pretrained(out / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **common)).save_pretrained(
        out / "text_encoder_2"
    )
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
        norm_num_groups=32, use_linear_projection=True,
    ).save_pretrained(out / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, norm_num_groups=32, sample_size=16, scaling_factor=0.13025,
    ).save_pretrained(out / "vae")
    EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="leading", steps_offset=1,
    ).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1", "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=1))
    return out


if __name__ == "__main__":
    make_pipeline(Path(sys.argv[1]))
