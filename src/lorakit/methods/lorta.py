"""LoRTA: Hounie et al., "LoRTA: Low Rank Tensor Adaptation of Large Language Models", arXiv:2410.04060.

One CP-rank-r tensor over (model dim d, head dim d_h, head H, layer L, matrix M ∈ {q, k, v, o}) holds every
attention update of the model. Its factors are shared by all adapted layers (`model.lorakit_shared`):

    A ∈ R^{d×r}, B ∈ R^{r×d_h} (zeros), C_h ∈ R^{H×r}, C_l ∈ R^{L×r}, C_m ∈ R^{M×r}  [, C_kv ∈ R^{H_kv×r}]

The block of head h in layer l, matrix m is the d × d_h matrix A · diag(C_h[h] ⊙ C_l[l] ⊙ C_m[m]) · B, scaled by
s = alpha / r. Its d side is the hidden state, its d_h side the head, so the heads are laid along the head axis
of each projection (transformers' LlamaAttention: q/k/v_proj map hidden -> H·d_h, o_proj maps H·d_h -> hidden):

    q, k, v (out × in):  ΔW = [Bᵀ diag(c_0) ; … ; Bᵀ diag(c_{H-1})] · Aᵀ   (head h = rows h·d_h … (h+1)·d_h)
    o       (out × in):  ΔW = A · [diag(c_0) B, …, diag(c_{H-1}) B]          (head h = the same columns)

so each ΔW has rank ≤ r and runs through the base class's fused low-rank path (`factors()` builds the out × r
and r × in factors from the shared tensors on every call: O(r·(in + out)), nothing dense). The authors' two
implementations disagree here: their PEFT code (ihounie/lorta, peft/src/peft/tuners/lorta/model.py,
`_compute_weights_from_tensor` + layer.py `Linear.forward`) puts the head blocks on the INPUT of all four
matrices, their lit-gpt code (instruction_tuning/lit_gpt/lora.py, `LoRALinear.forward`) on the OUTPUT of all four.
Each is right for one side only (q/k/v heads are outputs, o's heads are inputs); lorakit follows the tensor's
semantics instead: mode d is always the hidden state and mode d_h always the head's own dimensions.

Grouped-query attention (k/v with H_kv < H heads, e.g. SmolLM2: 9 query, 3 key/value heads; not handled by the
authors' code, which assumes H_kv = H): k and v read their own head factor C_kv (H_kv × r), drawn like C_h. With
H_kv = H, k and v read C_h as in the authors' code. Rows exist only for what is adapted: C_l has one row per
adapted layer (L = their count; a regex adapting layer 0 only gives L = 1), C_m one per adapted matrix kind (M = 4
for q, k, v, o), and a head factor only where a module reads it (with GQA and only k/v adapted there is no C_h).
Trained parameters for the whole model, counted once:

    r · (d + d_h + L + M)  +  r · H  (C_h: unless GQA with only k/v adapted)  +  r · H_kv  (C_kv: GQA, k or v adapted)

e.g. SmolLM2-135M (d 576, d_h 64, H 9, H_kv 3, L 30), q/k/v/o, r = 16: 16 · (576 + 64 + 9 + 30 + 4 + 3) = 10,976.

Init (the authors' `inject_adapter`): A Kaiming-uniform with a = √5 and fan_in = r, i.e. U(±1/√r); B = 0, so the
output is unchanged at init; the C factors Kaiming-uniform with a = √5 · init_scale, fan_in = r, i.e.
U(±√(6 / ((1 + 5·init_scale²)·r))). Every script of the authors sets init_scale = 0, the default here (U(±√(6/r))).
Draws come from generators seeded by (seed, "lorakit_shared", "lorta:<factor>").

Options: `init_scale` (0.0). Only q_proj, k_proj, v_proj, o_proj of Llama-family attention are adapted, or
Phi-3's fused qkv_proj, whose output [q | k | v] takes the q, k and v updates stacked over the one A' = Aᵀ:

    qkv (out × in):  ΔW = [B'_q ; B'_k ; B'_v] · Aᵀ   (B'_m = [Bᵀ diag(c_0^m) ; …], rank ≤ r, as a q_proj, k_proj
                                                       and v_proj of the same layer would give)

Anything else (MLP layers, GPT-2's fused c_attn, BERT) is refused before the model is touched.

Learning rate: the authors used 3e-4 to 4e-4 (their LoRA baseline: 3e-4) for instruction tuning with alpha 16 and
r ≈ 235, and 1e-2 to 5e-2 on GLUE and GSM8K where the scale alpha/r was small; start at LoRA's rate with the same
alpha/r and sweep upwards. Measured here (docs/reproduction.md): on SmolLM2-135M at alpha = r = 16, 60 steps, the
best rate was 8.1e-2 (15-step eval loss 3.380; 2.7e-2: 3.485; 2.43e-1: 3.883), 90x LoRA's 9e-4.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .. import random as lk_random
from ..base_layers import frozen_base
from ..errors import ConfigError
from ..layer import AdapterLayer, SharedParameters, base_of, linear_shape
from ..options import Option
from . import register_method

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj")  # the order of C_m's rows (adapted ones only)
KV_MATRICES = ("k_proj", "v_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # Phi-3: one projection, outputs [q | k | v]
TARGETS_HINT = (
    "pass targets q_proj,k_proj,v_proj,o_proj (CLI: --targets q_proj,k_proj,v_proj,o_proj), or qkv_proj,o_proj "
    "where q, k and v are fused as in Phi-3"
)


def parse_target(name: str) -> tuple[int, str]:
    """(layer index, matrix) of an attention projection such as `model.layers.3.self_attn.q_proj`."""
    matrix = name.rsplit(".", 1)[-1]
    layers = re.findall(r"(?:^|\.)(\d+)(?=\.)", name)
    if matrix not in MATRICES and matrix not in FUSED:
        raise ConfigError(
            f"lorta cannot adapt {name}: LoRTA needs separate q_proj, k_proj, v_proj, o_proj attention projections, "
            f"or Phi-3's fused qkv_proj and o_proj (MLP layers and other fused layers such as GPT-2's c_attn are not "
            f"supported); {TARGETS_HINT}"
        )
    if not layers:
        raise ConfigError(f"lorta cannot adapt {name}: its name has no layer index (like model.layers.3...)")
    return int(layers[-1]), matrix


def attention_dims(model: nn.Module) -> dict[str, int]:
    """d, d_h, H, H_kv, L from the model's transformers config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    fields = ("hidden_size", "num_attention_heads", "num_hidden_layers")
    if config is None or any(not isinstance(getattr(config, f, None), int) for f in fields):
        raise ConfigError(
            f"lorta needs the model's config ({', '.join(fields)}) to shape its tensor; "
            f"{type(model).__name__} has none: adapt a transformers Llama-family model"
        )
    heads = config.num_attention_heads
    return {
        "d": config.hidden_size,
        "d_h": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "H": heads,
        "H_kv": getattr(config, "num_key_value_heads", None) or heads,
        "L": config.num_hidden_layers,
    }


def _uniform(rows: int, cols: int, bound: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(rows, cols, generator=gen, dtype=torch.float32).mul_(2 * bound).sub_(bound)


class LortaTensor(SharedParameters):
    """The CP factors, owned once by the model; `layer_rows` / `matrix_rows` map a layer's (l, m) to its row."""

    def __init__(self, dims, layers, matrices, kv_factor, r, init_scale, seed, device, dtype):
        super().__init__()
        self.dims, self.r = dims, r
        self.layer_rows = {layer: row for row, layer in enumerate(layers)}
        self.matrix_rows = {matrix: row for row, matrix in enumerate(matrices)}
        self.kv_factor = kv_factor
        shapes = {"A": (dims["d"], r), "B": (r, dims["d_h"])}
        if not kv_factor or any(m not in KV_MATRICES for m in matrices):  # C_h is read by q/o (and k/v without GQA)
            shapes["C_h"] = (dims["H"], r)
        shapes |= {"C_l": (len(layers), r), "C_m": (len(matrices), r)}
        if kv_factor:
            shapes["C_kv"] = (dims["H_kv"], r)
        # instance attributes: C_kv exists only with GQA, C_h only where q, o (or k, v without GQA) read it
        self.trainable = self.stored = tuple(shapes)
        c_bound = math.sqrt(6.0 / ((1.0 + 5.0 * init_scale**2) * r))  # gain √(2/(1+a²)) · √(3/fan_in)
        for name, (rows, cols) in shapes.items():
            gen = lk_random.generator(seed, "lorakit_shared", f"lorta:{name}")
            if name == "B":
                value = torch.zeros(rows, cols)
            else:
                value = _uniform(rows, cols, 1.0 / math.sqrt(r) if name == "A" else c_bound, gen)
            setattr(self, name, nn.Parameter(value.to(device=device, dtype=dtype)))

    def extra_repr(self) -> str:
        return f"r={self.r}, " + ", ".join(f"{k}={v}" for k, v in self.dims.items())


@register_method
class LortaLayer(AdapterLayer):
    method = "lorta"
    trainable = ()  # everything trained lives in the shared LortaTensor
    stored = ()
    options = {
        "init_scale": Option(
            0.0, float, "Kaiming a = √5·init_scale for the C factors (authors' scripts: 0)", minimum=0.0
        ),
    }

    @classmethod
    def check_config(cls, config):
        if config.init != "kaiming":
            raise ConfigError(
                f"init={config.init!r} is not available for lorta; its factors use the authors' Kaiming-uniform "
                "init (tune it with the init_scale option)"
            )

    @classmethod
    def check_layer(cls, config, name, in_features, out_features):
        parse_target(name)

    @classmethod
    def stored_shapes(cls, config, in_features, out_features):
        return {}

    @classmethod
    def build_shared(cls, model, config, names):
        dims = attention_dims(model)
        d, d_h, heads, kv_heads = dims["d"], dims["d_h"], dims["H"], dims["H_kv"]
        expected = {"q_proj": (d, heads * d_h), "k_proj": (d, kv_heads * d_h), "v_proj": (d, kv_heads * d_h)}
        expected["o_proj"] = (heads * d_h, d)
        expected["qkv_proj"] = (d, (heads + 2 * kv_heads) * d_h)
        seen = {}
        for name in names:
            layer, target = parse_target(name)
            if layer >= dims["L"]:
                raise ConfigError(f"lorta: {name} has layer index {layer} but the model has {dims['L']} layers")
            for matrix in FUSED.get(target, (target,)):
                if (layer, matrix) in seen:
                    raise ConfigError(
                        f"lorta: {seen[layer, matrix]} and {name} are both layer {layer} {matrix}; LoRTA indexes one "
                        "attention per layer: narrow targets to one of them"
                    )
                seen[layer, matrix] = name
            shape = linear_shape(model.get_submodule(name))
            matrix = target
            if shape != expected[matrix]:
                raise ConfigError(
                    f"lorta cannot adapt {name}: it maps {shape[0]} -> {shape[1]}, but the model config "
                    f"(hidden {d}, {heads} heads, {kv_heads} kv heads of {d_h}) implies {expected[matrix][0]} -> "
                    f"{expected[matrix][1]}; {TARGETS_HINT} on a Llama-family model"
                )
        matrices = [m for m in MATRICES if any(m == seen_m for _, seen_m in seen)]
        frozen = frozen_base(base_of(model.get_submodule(names[0])))
        weight_dtype, device = frozen.dtype, frozen.device
        dtype = torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype
        return LortaTensor(
            dims,
            layers=sorted({layer for layer, _ in seen}),
            matrices=matrices,
            kv_factor=kv_heads < heads and any(m in KV_MATRICES for m in matrices),
            r=config.r,
            init_scale=config.option("init_scale"),
            seed=config.seed,
            device=device,
            dtype=dtype,
        )

    def build(self) -> None:
        self.layer_index, self.matrix = parse_target(self.name)
        self.layer_row = self.shared.layer_rows[self.layer_index]
        self.parts = FUSED.get(self.matrix, (self.matrix,))  # the matrices whose rows this layer's output stacks

    def initialize(self) -> None:
        """Nothing per layer: the shared tensor is drawn once, in `build_shared`."""

    def head_coefficients(self, matrix: str | None = None) -> torch.Tensor:
        """c_h = C_h[h] ⊙ C_l[l] ⊙ C_m[m] for every head h of matrix m (default: this projection's): (heads × r)."""
        t, matrix = self.shared, matrix or self.matrix
        head_factor = "C_kv" if t.kv_factor and matrix in KV_MATRICES else "C_h"
        return getattr(t, head_factor) * (t.C_l[self.layer_row] * t.C_m[t.matrix_rows[matrix]])

    def factors(self):
        t = self.shared
        if self.matrix == "o_proj":  # heads along the input: A' = [diag(c_0) B, …] (r × H·d_h), B' = A
            coeff = self.head_coefficients()
            return (coeff.T[:, :, None] * t.B[:, None, :]).reshape(self.r, -1), t.A
        # heads along the output: B' = [Bᵀ diag(c_0) ; …] (H·d_h × r), A' = Aᵀ; a fused qkv_proj stacks the B' of
        # q, k and v (its output is [q | k | v]) over the same A'. A' is made contiguous (r × d, like LoRA's A; 4.6k
        # numbers for SmolLM2 at r = 8): the gradient of a transposed view is a (d × r) GEMM over a transposed input,
        # which CPU BLAS copies first (~8% of a q/k/v/o forward+backward at T = 1024)
        blocks = [self.head_coefficients(m)[:, None, :] * t.B.T[None, :, :] for m in self.parts]
        return t.A.T.contiguous(), torch.cat([b.reshape(-1, self.r) for b in blocks])

    def export_factors(self):
        # copies: o_proj's B' IS the shared A, and safetensors refuses tensors that share memory
        return tuple(t.detach().clone() for t in self.factors())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer_index}, matrix={self.matrix}"
