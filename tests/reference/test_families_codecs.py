"""The SD1.5, SD3 and Flux codecs against the diffusers pipelines' own ``encode_prompt`` and VAE formulas, on tiny
pipeline folders that the tests build (random weights, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.config.fields import validate
from lightning_distill.config.registry import CODECS

CAPTIONS = [
    "a red cat",
    "",
    # longer than the tiny CLIPs' 16 tokens (and than 8 T5 tokens): both tokenizers truncate it
    "a photo of a small blue dog on the left with a big green square and a red circle on the right",
]


def _codec(name: str, folder, **fields):
    cls = CODECS.get(name)
    return cls(validate({"pretrained": str(folder), **fields}, cls.Config))


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    err = (ours - theirs.float()).abs().max().item()
    assert err <= tol, err


@torch.no_grad()  # as in the pipelines' __call__: with grad on, CPU attention takes another kernel (~1e-5 off)
def _encode_prompt(pipe, *args, **kwargs):
    return pipe.encode_prompt(*args, **kwargs)


def _pipe(cls_name: str, folder, **components):
    import diffusers

    return getattr(diffusers, cls_name).from_pretrained(str(folder), **components)


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return _pipe("StableDiffusionPipeline", tiny_sd15)


@pytest.fixture(scope="module")
def sd3(tiny_sd3):
    return _pipe("StableDiffusion3Pipeline", tiny_sd3)


@pytest.fixture(scope="module")
def flux(tiny_flux):
    return _pipe("FluxPipeline", tiny_flux)


def test_the_long_caption_is_truncated_by_every_tokenizer(sd3):
    for tokenizer in (sd3.tokenizer, sd3.tokenizer_2):
        assert len(tokenizer(CAPTIONS[-1]).input_ids) > tokenizer.model_max_length == 16
    assert len(sd3.tokenizer_3(CAPTIONS[-1]).input_ids) > 8


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
@pytest.mark.parametrize("size", [32, 64])
def test_tiny_pipeline_runs_end_to_end(request, family, size):
    pipe = request.getfixturevalue(family)
    images = pipe(prompt="a red cat", num_inference_steps=2, height=size, width=size, output_type="pt").images
    assert images.shape == (1, 3, size, size) and torch.isfinite(images).all()


def test_sd15_text_matches_encode_prompt(tiny_sd15, sd15):
    ours = _codec("sd15", tiny_sd15).encode_text(CAPTIONS)
    theirs, _ = _encode_prompt(sd15, CAPTIONS, "cpu", 1, do_classifier_free_guidance=False)
    assert set(ours) == {"text"} and ours["text"].shape == (3, 16, 32)
    _assert_close(ours["text"], theirs, 1e-6)


def test_sd15_empty_caption_is_the_pipelines_negative_prompt(tiny_sd15, sd15):
    codec = _codec("sd15", tiny_sd15)
    assert codec.zero_null is False
    _, negative = _encode_prompt(sd15, ["a red cat"], "cpu", 1, do_classifier_free_guidance=True, negative_prompt=None)
    empty = codec.encode_text([""])["text"]
    assert empty.abs().max() > 0.1  # encoded, not zeroed
    _assert_close(empty, negative, 1e-6)


@pytest.mark.parametrize("length", [8, 256])
def test_sd3_text_matches_encode_prompt(tiny_sd3, sd3, length):
    codec = _codec("sd3", tiny_sd3, **({} if length == 256 else {"max_sequence_length": length}))
    ours = codec.encode_text(CAPTIONS)
    text, _, pooled, _ = _encode_prompt(
        sd3, CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=length
    )
    assert ours["text"].shape == (3, 16 + length, 32) and ours["pooled"].shape == (3, 64)
    assert ours["text"][:, :16, 24:].abs().max() == 0  # CLIP widths 8 + 16, zero-padded to T5's 32
    _assert_close(ours["text"], text, 1e-6)
    _assert_close(ours["pooled"], pooled, 1e-6)


def test_sd3_without_t5_matches_the_pipeline_without_text_encoder_3(tiny_sd3):
    codec = _codec("sd3", tiny_sd3, t5=False, max_sequence_length=8)
    assert codec.text_encoder_3 is None and codec.zero_null is False
    pipe = _pipe("StableDiffusion3Pipeline", tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    ours = codec.encode_text(CAPTIONS)
    text, _, pooled, _ = _encode_prompt(
        pipe, CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=8
    )
    assert ours["text"][:, 16:].abs().max() == 0 and ours["text"][:, :16].abs().max() > 0.1
    _assert_close(ours["text"], text, 1e-6)
    _assert_close(ours["pooled"], pooled, 1e-6)


@pytest.mark.parametrize("length", [8, 512])
def test_flux_text_matches_encode_prompt(tiny_flux, flux, length):
    codec = _codec("flux", tiny_flux, **({} if length == 512 else {"max_sequence_length": length}))
    ours = codec.encode_text(CAPTIONS)
    text, pooled, _ = _encode_prompt(flux, CAPTIONS, None, device="cpu", max_sequence_length=length)
    assert ours["text"].shape == (3, length, 32) and ours["pooled"].shape == (3, 32)
    _assert_close(ours["text"], text, 1e-6)
    _assert_close(ours["pooled"], pooled, 1e-6)


@pytest.mark.parametrize("family, channels, scale, shift", [
    ("sd15", 4, 0.18215, None), ("sd3", 16, 1.5305, 0.0609), ("flux", 16, 0.3611, 0.1159),
])
def test_vae_matches_the_pipelines_formulas(request, family, channels, scale, shift):
    codec = _codec(family, request.getfixturevalue(f"tiny_{family}"), text_encoders=False)
    vae = request.getfixturevalue(family).vae
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (scale, shift)
    assert codec.scale_factor == 8
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        latents = codec.encode(pixels)
        assert latents.shape == (2, channels, 4, 4)
        _assert_close(latents, (vae.encode(pixels).latent_dist.mean - (shift or 0.0)) * scale, 1e-5)
        z = torch.randn(2, channels, 4, 4, generator=g)
        _assert_close(codec.decode(z), vae.decode(z / scale + (shift or 0.0)).sample, 1e-5)


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_user_errors(request, family):
    from lightning_distill import UserError

    folder = request.getfixturevalue(f"tiny_{family}")
    with pytest.raises(UserError, match="text_encoders: true"):
        _codec(family, folder, text_encoders=False).encode_text(["a red cat"])
    with pytest.raises(UserError, match="no folder"):
        _codec(family, folder / "missing")
    if family != "sd15":
        with pytest.raises(UserError, match="max_sequence_length"):
            _codec(family, folder, max_sequence_length=513)
