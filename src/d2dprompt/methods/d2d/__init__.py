"""D2D, the idea D2D-Prompt starts from: fixed hand-written sentences, nothing learned; maps from the cross-attention
on the `d2d` block's words, through D2D-Prompt's capture, aggregation and scoring (model.py: the fixed prompts).
train@d2d writes the sentences' record and an empty weights file, so evaluate reads every method the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field, model_validator

from d2dprompt.core.runtime import distributed
from d2dprompt.core.runtime.config import Block, Invalid
from d2dprompt.methods.base import TrainJob, config_record
from d2dprompt.methods.d2dprompt import D2DPromptMethod

if TYPE_CHECKING:
    import torch

    from d2dprompt.core.runtime.config import CoreParams
    from d2dprompt.methods.d2dprompt.model import D2DSegmenter


class D2DParams(Block):
    """The original D2D: fixed prompts, attention read on the listed words (found by token id)."""

    normal_prompt: str = Field("a photo of a flawless object", min_length=1)  # D2D's hand-written normal prompt
    abnormal_prompt: str = Field("a photo of a damaged object", min_length=1)  # ... and its abnormal twin
    normal_words: list[str] = Field(["flawless", "object"], min_length=1)  # content words whose attention forms the normal map
    abnormal_words: list[str] = Field(["damaged", "object"], min_length=1)  # ... the abnormal map

    @model_validator(mode="after")
    def _words_in_prompts(self) -> D2DParams:
        for side in ("normal", "abnormal"):
            words = getattr(self, f"{side}_prompt").lower().replace(".", " ").split()
            for word in getattr(self, f"{side}_words"):
                if word.lower() not in words:
                    raise Invalid(f"{side}_words", f"{word!r} is not a word of d2d.{side}_prompt {getattr(self, f'{side}_prompt')!r}")
        return self


class D2DMethod(D2DPromptMethod):
    name = "d2d"
    params = D2DParams
    record_blocks = ("model", "attention", "d2d")

    def train(self, params: CoreParams, job: TrainJob) -> list[dict[str, float]]:
        """Nothing to learn: the record of the fixed sentences, an empty weights file, a history with no epochs."""
        from d2dprompt.core.training import write_trained

        if distributed.is_main():  # several processes: rank 0 writes
            write_trained(job.out, {}, config_record(self, params), [])
            job.echo(f"d2d: fixed prompts {params.d2d.normal_prompt!r} / {params.d2d.abnormal_prompt!r}, nothing to train")
        return []

    def build(self, params: CoreParams, record: dict) -> D2DSegmenter:
        from d2dprompt.core.models import load_frozen
        from d2dprompt.methods.d2d.model import FixedPrompts
        from d2dprompt.methods.d2dprompt.model import D2DSegmenter

        sd = load_frozen(params.model.pretrained, params.model.tiny_seed)
        d = params.d2d
        prompts = FixedPrompts(sd.tokenizer, d.normal_prompt, d.abnormal_prompt, d.normal_words, d.abnormal_words, params.attention.prompts == "joint")
        return D2DSegmenter(sd, prompts, params.attention.levels, params.model.timestep)

    def load_weights(self, model: D2DSegmenter, weights: dict[str, torch.Tensor], record: dict) -> D2DSegmenter:
        return model.eval()  # nothing was learned: the weights file is empty
