"""LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.

    y = W x + s · B A x,   A ∈ R^{r×in} Kaiming-uniform(a=√5) (or N(0, (1/r)²) with init="gaussian"),
                           B ∈ R^{out×r} zeros,  s = alpha / r (alpha / √r with rsLoRA, arXiv:2312.03732).

Trainable parameters per layer: r · (in + out). B = 0 makes the output equal the base output at init.
"""

from __future__ import annotations

import torch

from .. import random as lk_random
from ..layer import AdapterLayer
from . import register_method


@register_method
class LoraLayer(AdapterLayer):
    method = "lora"
    trainable = ("A", "B")
    stored = ("A", "B")

    @classmethod
    def useful_rank(cls, config, in_features, out_features):
        return min(in_features, out_features), "rank(B A) <= min(in, out)"

    @classmethod
    def stored_shapes(cls, config, in_features, out_features):
        return {"A": (config.r, in_features), "B": (out_features, config.r)}

    def build(self) -> None:
        self.A = self.new_parameter(torch.zeros(self.r, self.in_features))
        self.B = self.new_parameter(torch.zeros(self.out_features, self.r))

    def initialize(self) -> None:
        gen = lk_random.generator(self.config.seed, self.name, "A")
        a = lk_random.down_projection(self.config.init, self.r, self.in_features, gen)
        with torch.no_grad():
            self.A.copy_(a)
            self.B.zero_()

    def factors(self):
        return self.A, self.B
