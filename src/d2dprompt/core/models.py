"""Frozen Stable Diffusion components: load from a hub id / diffusers folder, or build the embedded `tiny` stack.

`tiny` is an SD-architecture stack (CLIP text encoder, UNet with cross-attention at several
resolutions, VAE, DDPM scheduler) built offline and deterministically from a seed, with the real
CLIP BPE vocabulary. It exists so the pipeline and its tests run anywhere; its random weights make
its metrics say nothing about real checkpoints.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from d2dprompt.core import hub
from d2dprompt.core.vae_factor import TINY, TINY_VAE_BLOCKS, factor_of

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI CLIP's BPE merges, as shipped in open_clip (MIT)


@dataclass
class FrozenSD:
    """The frozen parts of a Stable Diffusion model, weights with requires_grad=False."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler

    @property
    def text_width(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (config.py knows it before the weights load)."""
        return factor_of(self.vae.config.block_out_channels)

    def to(self, device: torch.device | str) -> "FrozenSD":
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device)
        return self


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    raw = resources.files("d2dprompt").joinpath("assets", BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # CLIP keeps 48,894 merges
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def bundled_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP tokenizer (49,408 tokens) built from the vocabulary inside this package."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)


def build_tiny(seed: int = 0) -> FrozenSD:
    """A small SD-architecture stack with weights drawn from `seed`; identical for identical seeds."""
    tokenizer = bundled_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,  # SD 1.5 uses 768, SD 2.1 1024; small keeps CPU tests fast
            intermediate_size=256,
            num_hidden_layers=12,  # as SD 1.5, so the default prompt depth 9 fits
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4, 4),  # diffusers reads this as the number of heads, like SD
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=TINY_VAE_BLOCKS,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=128,
        scaling_factor=4.85,  # as SD's 0.18215: unit-variance latents (raw std 0.206 on the bundled sample)
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )  # SD's training schedule
    return _freeze(FrozenSD(tokenizer, text_encoder, unet, vae, scheduler))


def build_sd21_architecture(seed: int = 0) -> FrozenSD:
    """stabilityai/stable-diffusion-2-1-base's unet / text_encoder / vae configs with random weights."""
    tokenizer = bundled_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,  # OpenCLIP ViT-H/14's 24 minus the last: SD 2 reads the penultimate layer
            num_attention_heads=16,
            hidden_act="gelu",
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
            projection_dim=512,
            bos_token_id=0,  # the published config's legacy ids; only pooling reads them and we never pool
            pad_token_id=1,
            eos_token_id=2,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),  # diffusers reads these as head counts (64 channels each)
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=False,  # 2.1-base (512 px) does not upcast; the 768 px 2.1 does
        norm_num_groups=32,
        norm_eps=1e-5,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=768,  # as published for 2.1-base (a config quirk that changes no layer)
        scaling_factor=0.18215,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return _freeze(FrozenSD(tokenizer, text_encoder, unet, vae, scheduler))


def save_tiny(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny stack as a diffusers folder in `dtype`, loadable by `load_frozen(folder)`."""
    sd = build_tiny(seed)
    folder = Path(folder)
    sd.tokenizer.save_pretrained(folder / "tokenizer")
    sd.text_encoder.to(dtype).save_pretrained(folder / "text_encoder")
    sd.unet.to(dtype).save_pretrained(folder / "unet")
    sd.vae.to(dtype).save_pretrained(folder / "vae")
    sd.scheduler.save_pretrained(folder / "scheduler")
    return folder


WEIGHTS_DTYPE = torch.float32  # frozen weights stay fp32 whatever a checkpoint was saved in; autocast does mixed precision


def load_frozen(pretrained: str, tiny_seed: int = 0) -> FrozenSD:
    """`tiny`, a hub id (e.g. stabilityai/stable-diffusion-2-1-base) or a local diffusers folder.

    Every component loads in WEIGHTS_DTYPE: transformers and diffusers would otherwise keep the dtype a
    checkpoint was saved in (fp16 for most published SD weights), and text encoder, UNet and cached
    queries would meet in different dtypes.
    """
    if pretrained == TINY:
        return build_tiny(tiny_seed)
    pretrained = hub.resolve(pretrained)
    local = Path(pretrained)
    if local.exists() and not (local / "unet").is_dir():
        raise FileNotFoundError(f"{pretrained}: not a diffusers folder (no unet/ subfolder)")
    sd = FrozenSD(
        tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=WEIGHTS_DTYPE),
        unet=UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=WEIGHTS_DTYPE),
        vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=WEIGHTS_DTYPE),
        scheduler=DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler"),
    )
    for module in (sd.text_encoder, sd.unet, sd.vae):
        module.to(WEIGHTS_DTYPE)  # a no-op unless a loader ignored the dtype it was given
    return _freeze(sd)


def _freeze(sd: FrozenSD) -> FrozenSD:
    """Frozen is not no_grad: weights stop learning, gradients still flow through them."""
    for module in (sd.text_encoder, sd.unet, sd.vae):
        module.requires_grad_(False)
        module.eval()
    return sd


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 list -> (B, 3, H, W) in [-1, 1], the VAE's input range."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


@torch.no_grad()
def encode(sd: FrozenSD, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 HxWx3 images -> (B, C, h, w) float32 latents on the CPU: the VAE's mean x its scaling factor."""
    return encode_with(sd.vae, images, device)


@torch.no_grad()
def encode_with(vae: AutoencoderKL, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    return vae_latents(vae, to_tensor(images).to(device, vae.dtype)).float().cpu()


def vae_latents(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the latents every stage reads: the VAE's mean x its scaling factor (an exported
    graph traces this too: methods/graph.py)."""
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def decode_with(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> (B, 3, H, W) pixels in [-1, 1] (unclipped, as DeCo-Diff compares them)."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()


def load_vae(pretrained: str, tiny_seed: int = 0) -> AutoencoderKL:
    """Only the VAE of `pretrained` (methods that need no text encoder or UNet), frozen, in WEIGHTS_DTYPE."""
    if pretrained == TINY:
        return build_tiny(tiny_seed).vae
    pretrained = hub.resolve(pretrained)
    local = Path(pretrained)
    if local.exists() and not (local / "vae").is_dir():
        raise FileNotFoundError(f"{pretrained}: not a diffusers folder (no vae/ subfolder)")
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=WEIGHTS_DTYPE).to(WEIGHTS_DTYPE)
    return vae.requires_grad_(False).eval()


def autocast(device: torch.device, precision: str):
    """Mixed precision on CUDA (bf16 for auto); CPU runs in fp32, where half precision is slow.

    `precision` is model.precision (checked by config.py) or bench's --precision, which may also say fp16.
    """
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type="cuda", dtype=dtype)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
