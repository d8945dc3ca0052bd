"""AnomalyCLIP (Zhou et al., ICLR 2024) as its authors built it, on a frozen HuggingFace `CLIPModel`.

Two object-agnostic learnable prompts ('X..X object.' / 'X..X damaged object.', with deep compound
prompts in the text encoder: the shared `d2dprompt.methods.prompt_learner.PromptLearner`) give a normal and an
abnormal text feature. The frozen vision encoder runs with DPAM: in its last `dpam_layers` blocks a
parallel path accumulates V-V self-attention, and the patch tokens of that path at `feature_layers`,
compared with the two text features, give per-patch [normal, abnormal] probabilities; the ordinary
path's class token gives the image-level probabilities. Pure torch, no I/O: the stages load, train,
smooth and score.

Facts taken from the authors' code (zqhang/AnomalyCLIP, main after the 2025-04 fix), which the
names below refer to:
- AnomalyCLIP_lib/AnomalyCLIP.py `DAPM_replace(DPAM_layer=20)` swaps the attention of
  resblocks[-1..-19], i.e. blocks 6..24 of ViT-L/14 (train.py's comment: "layer from 6 to 24");
  DPAM_layer=1 means none. Here `dpam_layers` counts those blocks: 19 = theirs, 0 = plain CLIP.
- In a DPAM block (`ffn=False`, the default used by train.py / test.py) the V-V attention reads
  ln_1 of the *original* path's input, softmax(v v^T * head_dim^-0.5) v, then out_proj, and is
  added to the parallel path, which has no MLP; the original path is the unchanged block.
- Map tokens at a listed layer come from the parallel path (the ordinary one before DPAM starts),
  through ln_post and proj. The global feature is the original path's class token @ proj, with NO
  ln_post (`x_ori[0, :, :] @ self.proj`), unlike stock CLIP.
- Positional embeddings at another input size: bilinear resize of the patch grid (align_corners
  False), class position untouched. transformers' own `interpolate_pos_encoding` uses bicubic.
- AnomalyCLIP_lib/model_load.py: similarity = softmax(cos / 0.07) over [normal, abnormal]; the patch
  maps are resized bilinearly to the image size before the loss and the map.
- test.py: map = sum over layers of (abnormal + 1 - normal) / 2 (here the mean: the same ranking, on [0, 1]),
  then Gaussian sigma 4 (left to the pipeline); image score = abnormal probability of the global feature alone, no fusion with the map.
- train.py + loss.py: loss = 4 * sum over layers [focal(gamma 2, smooth 1e-5) + dice(abnormal, mask)
  + dice(normal, 1 - mask)] + cross-entropy(global logits / 0.07, label); dice smooth 1, averaged
  per image. Before the fix, `x += x_res` in place made the [6, 12, 18, 24] taps four copies of the
  layer-24 map, so --features_list 24 with weight 4 reproduces the published training loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer

from d2dprompt.core.losses import focal_loss
from d2dprompt.core.models import WEIGHTS_DTYPE, bundled_clip_tokenizer
from d2dprompt.methods.prompt_learner import PromptLearner

TINY = "tiny"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics (authors' constants.py)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPERATURE = 0.07  # the authors' fixed temperature for patch and image similarities (not CLIP's logit_scale)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 in 0..255 or float in [0, 1] -> CLIP-normalised float32."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------- CLIP


def build_tiny_clip(seed: int, image_size: int) -> CLIPModel:
    """A small CLIP with ViT-L/14's depth and patch size and CLIP's vocabulary; a pure function of `seed`."""
    tokenizer = bundled_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,  # small keeps CPU tests fast
            intermediate_size=256,
            num_hidden_layers=12,  # as CLIP ViT-L/14's text tower, so the authors' depth 9 fits
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            hidden_act="quick_gelu",  # OpenAI CLIP's activation
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,  # the real id, so pooling finds the first EOT
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=24,  # as ViT-L/14, so the paper's layer numbers (DPAM 6..24, tap 24) fit
            num_attention_heads=2,
            patch_size=14,
            image_size=image_size,
            hidden_act="quick_gelu",
        ),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random stream
        torch.manual_seed(seed)
        clip = CLIPModel(config)
    return _freeze(clip)


def load_clip(pretrained: str, tiny_seed: int, image_size: int) -> tuple[CLIPModel, CLIPTokenizer]:
    """`tiny` (built from `tiny_seed` at `image_size`) or a hub id / local folder of a CLIPModel.

    A real checkpoint keeps its own config image size (336 for ViT-L/14@336); other input sizes go
    through positional interpolation, so `image_size` is read for `tiny` only.
    """
    if pretrained == TINY:
        return build_tiny_clip(tiny_seed, image_size), bundled_clip_tokenizer()
    from d2dprompt.core import hub

    pretrained = hub.resolve(pretrained, "anomalyclip.pretrained")
    clip = CLIPModel.from_pretrained(pretrained, dtype=WEIGHTS_DTYPE)
    return _freeze(clip.to(WEIGHTS_DTYPE)), CLIPTokenizer.from_pretrained(pretrained)


def _freeze(clip: CLIPModel) -> CLIPModel:
    """Frozen is not no_grad: the text tower must still pass gradients to the prompts."""
    clip.requires_grad_(False)
    return clip.eval()


# -------------------------------------------------------------------------------------------- vision


def position_embeddings(clip: CLIPModel, grid: tuple[int, int]) -> torch.Tensor:
    """(1 + h*w, D) positional embeddings for an h x w patch grid, resized as the authors do."""
    table = clip.vision_model.embeddings.position_embedding.weight
    side = round((int(table.shape[0]) - 1) ** 0.5)  # int(): a constant when traced for export
    if tuple(grid) == (side, side):
        return table
    patches = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(grid), mode="bilinear")
    return torch.cat([table[:1], patches.flatten(2).transpose(1, 2)[0]])


def embed_images(clip: CLIPModel, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Class + patch tokens after the pre-layernorm, and the patch grid (h, w)."""
    vision = clip.vision_model
    emb = vision.embeddings
    patches = emb.patch_embedding(images.to(emb.patch_embedding.weight.dtype))
    grid = (patches.shape[-2], patches.shape[-1])
    cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
    tokens = torch.cat([cls, patches.flatten(2).transpose(1, 2)], dim=1)
    return vision.pre_layrnorm(tokens + position_embeddings(clip, grid)), grid


def _block(layer: CLIPEncoderLayer, hidden: torch.Tensor) -> torch.Tensor:
    out = layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out


def vv_attention(attn: CLIPAttention, normed: torch.Tensor) -> torch.Tensor:
    """out_proj(softmax(v v^T * scale) v), per head: query and key replaced by the value."""
    batch, length, width = normed.shape
    v = attn.v_proj(normed).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    mixed = F.scaled_dot_product_attention(v, v, v, scale=attn.scale)
    return attn.out_proj(mixed.transpose(1, 2).reshape(batch, length, width))


def dpam_block(layer: CLIPEncoderLayer, parallel: torch.Tensor, original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPAM block -> (parallel, original). The V-V term reads the original path's input."""
    parallel = parallel + vv_attention(layer.self_attn, layer.layer_norm1(original))
    return parallel, _block(layer, original)


def encode_image(
    clip: CLIPModel, images: torch.Tensor, dpam_layers: int, feature_layers: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
    """-> global feature (B, P), patch features per feature layer in block order (B, h*w, P), grid."""
    vision = clip.vision_model
    hidden, grid = embed_images(clip, images)
    layers = vision.encoder.layers
    first_dpam = len(layers) - dpam_layers  # 0-based index of the first block with DPAM
    parallel = None
    taps = []
    for index, layer in enumerate(layers):
        if index >= first_dpam:
            parallel, hidden = dpam_block(layer, hidden if parallel is None else parallel, hidden)
        else:
            hidden = _block(layer, hidden)
        if index + 1 in feature_layers:
            taps.append(hidden if parallel is None else parallel)
    patches = [clip.visual_projection(vision.post_layernorm(t[:, 1:])) for t in taps]
    return clip.visual_projection(hidden[:, 0]), patches, grid


# ---------------------------------------------------------------------------------------------- maps


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def patch_similarity(patches: torch.Tensor, text: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, P) patch features, (2, P) unit text features -> (B, 2, h, w) [normal, abnormal] probabilities."""
    probs = (_unit(patches.float()) @ text.T / TEMPERATURE).softmax(-1)
    return probs.transpose(1, 2).reshape(patches.shape[0], 2, *grid)


def upsample(similarity: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(similarity, size=tuple(size), mode="bilinear")  # authors' get_similarity_map


def anomaly_map(similarity: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """(B, H, W) in [0, 1]: the mean over layers of (abnormal + 1 - normal) / 2 after upsampling; not smoothed.

    The authors sum over layers, a map in [0, L]; the mean ranks every pixel and image the same (so every metric is
    the same) and keeps the map on the [0, 1] scale the fixed threshold (evaluate.sensitivity) is given on."""
    maps = [upsample(s, size) for s in similarity]
    return torch.stack([(m[:, 1] + 1 - m[:, 0]) / 2 for m in maps]).mean(0)


def image_score(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,): the abnormal probability of the global feature, as the authors' test.py scores images."""
    return out["image_probs"][:, 1]


# --------------------------------------------------------------------------------------------- model


class AnomalyCLIP(nn.Module):
    """Only `self.prompts` trains; the CLIP is a plain attribute, out of state_dict and `.to()`.

    Move the CLIP yourself (`model.clip.to(device)`), as the SD parts of D2DSegmenter.
    """

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: CLIPTokenizer,
        n_ctx: int = 12,  # authors' train.sh: 12 learned context tokens per prompt
        t_n_ctx: int = 4,  # authors' train.sh: 4 compound tokens per text layer
        depth: int = 9,  # authors' train.sh: compound prompts at text layers 1..8
        object_word: str = "object",  # the object-agnostic class name of prompt_ensemble.py
        abnormal_word: str = "damaged",  # its abnormal state template "damaged {}"
        init_std: float = 0.02,  # prompt_ensemble.py's normal_(std=0.02)
        dpam_layers: int = 19,  # the authors' DPAM_layer=20: blocks 6..24 of 24
        feature_layers: Sequence[int] = (24,),  # the authors' --features_list 24 since the 2025-04 fix
    ):
        super().__init__()
        self.__dict__["clip"] = clip  # a plain attribute: frozen weights are not ours to save
        n_vision = clip.config.vision_config.num_hidden_layers
        if not 0 <= dpam_layers <= n_vision:
            raise ValueError(f"anomalyclip.dpam_layers={dpam_layers}: must lie in 0..{n_vision} (vision blocks)")
        layers = tuple(sorted(set(int(i) for i in feature_layers)))
        if not layers or not all(1 <= i <= n_vision for i in layers):
            raise ValueError(
                f"anomalyclip.feature_layers={list(feature_layers)}: need one or more layer numbers in 1..{n_vision}"
            )
        self.dpam_layers = dpam_layers
        self.feature_layers = layers  # block order, duplicates dropped, as the authors' `idx in out_layers`
        self.prompts = PromptLearner(
            tokenizer, clip.text_model, n_ctx, t_n_ctx, depth, object_word, abnormal_word, init_std, joint=False
        )
        eot = (self.prompts.input_ids == tokenizer.eos_token_id).int().argmax(-1)  # first EOT, as CLIP pools
        self.register_buffer("eot", eot, persistent=False)

    def text_features(self) -> torch.Tensor:
        """(2, P) unit [normal, abnormal] text features; carries the graph to the prompts."""
        states = self.prompts.encode_prompts(self.clip.text_model)
        pooled = states[torch.arange(states.shape[0], device=states.device), self.eot.to(states.device)]
        return _unit(self.clip.text_projection(pooled).float())

    def forward(self, images: torch.Tensor, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) CLIP-normalised; `text` reuses precomputed text_features() at inference.

        -> similarity: per feature layer (B, 2, h, w) patch-grid probabilities [normal, abnormal];
           image_logits (B, 2) (cosine / temperature), image_probs (B, 2); anomaly_map (B, H, W);
           text (2, P).
        """
        text = self.text_features() if text is None else text
        with torch.no_grad():  # frozen and upstream of nothing trainable (the authors run it so too)
            image, patches, grid = encode_image(self.clip, images, self.dpam_layers, self.feature_layers)
        similarity = [patch_similarity(p, text, grid) for p in patches]
        logits = _unit(image.float()) @ text.T / TEMPERATURE
        return {
            "similarity": similarity,
            "image_logits": logits,
            "image_probs": logits.softmax(-1),
            "anomaly_map": anomaly_map(similarity, images.shape[-2:]),
            "text": text,
        }


# ---------------------------------------------------------------------------------------------- loss


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over images of (2 sum(p t) + smooth) / (sum p + sum t + smooth): loss.py's BinaryDiceLoss."""
    p, t = pred.flatten(1), target.flatten(1)
    return 1 - ((2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def anomalyclip_loss(
    out: dict[str, torch.Tensor],
    masks: torch.Tensor,
    labels: torch.Tensor,
    local_weight: float = 4.0,  # train.py's lam = 4 since the 2025-04 fix
    focal_gamma: float = 2.0,  # loss.py's FocalLoss default
    focal: float = 1.0,  # per-term switches (the loss block's weights), 1 = the authors' loss; 0 ablates the term
    dice: float = 1.0,
    image: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """masks (B, H, W) in {0, 1}, labels (B,) in {0, 1} -> (total, unweighted terms summed over layers).

    total = local_weight * (focal * focal_term + dice * dice_terms) + image * cross_entropy.
    """
    weights = {"focal": focal, "dice": dice, "image": image}
    masks = (masks > 0.5).to(torch.float32)  # train.py binarises the resized mask at 0.5
    focal_term = dice_term = masks.new_zeros(())
    for similarity in out["similarity"]:
        probs = upsample(similarity, masks.shape[-2:])
        focal_term = focal_term + focal_loss(probs, masks, focal_gamma)
        dice_term = dice_term + dice_loss(probs[:, 1], masks) + dice_loss(probs[:, 0], 1 - masks)
    image_term = F.cross_entropy(out["image_logits"], labels.long().to(out["image_logits"].device))
    total = local_weight * (weights["focal"] * focal_term + weights["dice"] * dice_term) + weights["image"] * image_term
    values = {"focal": focal_term, "dice": dice_term, "image": image_term, "total": total}
    return total, {name: float(v.detach()) for name, v in values.items()}


@torch.no_grad()
def score_images(model: AnomalyCLIP, images: torch.Tensor, scoring, device: torch.device,
                 text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of images in [0, 1] -> (maps at scoring.map_size, image scores as the authors' test.py), on the CPU.
    `text`: the prompts' text features when fixed (an exported graph holds them), else computed here."""
    from d2dprompt.core.eval.maps import to_image_size
    from d2dprompt.core.models import autocast

    with autocast(device, scoring.precision):
        out = model(normalize(images).to(device), text)
    return to_image_size(out["anomaly_map"].float(), scoring.map_size, scoring.sigma).cpu(), image_score(out).float().cpu()


class FixedTextGraph(nn.Module):
    """AnomalyCLIP as export.py traces it: `score_images` with the learned prompts' text features computed once, at
    export, and held as a constant (after training the prompts are fixed, so the text tower's output is too)."""

    def __init__(self, model: AnomalyCLIP, scoring):
        super().__init__()
        self.model, self.scoring = model, scoring
        with torch.no_grad():
            self.register_buffer("text", model.text_features().detach())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return score_images(self.model, images, self.scoring, torch.device("cpu"), self.text)
