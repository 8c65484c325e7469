"""Flat-LoRA: Li et al., "Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape", arXiv:2409.14396.

Flat-LoRA trains the adapter on the expected loss under random perturbations of the FULL merged weight
W' = W + s·ΔW (paper, Section 3: a Bayesian expectation loss instead of SAM's worst case). Each optimizer step t:

    ε_ij ~ N(0, σ_i²),   σ_i = f(t) · ρ · ‖W'_i‖ / √in,   f(t) = ½ (1 − cos(π t / T))      (filter-wise, per output row)

then forward and backward through W + ε (the adapter path unchanged), then ε is removed. f grows from 0 to 1 over
the run (the paper's cosine-increasing noise schedule); ρ = `rho` defaults to 0.05, the authors' README example
(their code's default is 0 and asserts ρ > 0).

Where lorakit differs from the authors' code, on purpose:
- The noise never touches the stored weight: the layer computes F.linear(x, W + ε, b) with a temporary W + ε
  (`AdapterLayer.weight_noise`), so after every step the base weights are bit-identical to before. The authors
  add ε in place and subtract it again, which is not exact in floating point (fl(W + ε) − ε ≠ W). ε itself is
  never kept: `before_step` fixes each layer's σ (a vector) and draws ε on the weight's device and in its dtype
  directly into the buffer that becomes W + ε (z ~ N(0, 1) drawn there, then scaled by σ_i and W added, both in
  place: ε = σ_i·z rounded to W's dtype, as W + ε is anyway). The buffers are the procedure's, one per adapted
  layer, reused from step to step: one extra copy of the adapted weights in memory, which a step holds anyway (its
  W + ε is kept for the backward pass), and no other full-size tensor (`tests/procedures/test_flat.py` counts the
  bytes; `benchmarks/bench_procedures.py` times it). Reuse spares the page faults of a fresh 400 MB each step on
  SmolLM2, and on a CPU the layers' z are drawn in parallel threads, one layer's generator each (torch draws
  normals on one core): 0.36 s -> 0.18 s for SmolLM2's 106 M weights on 2 cores. All micro-batches of a step
  share the one W + ε. σ's row norms ‖W'_i‖ are taken a block of rows at a time (W'
  formed per block from the low-rank factors; MoRA and MELoRA, whose update is not a product of two factors, form
  their dense s·ΔW once).
- ε comes from a generator on the weight's device seeded by (seed, step, module), not the clock: a resumed run
  draws the same noise, every process of a DDP run draws the same ε, and all micro-batches of one
  gradient-accumulation step share it (the same device kind and model: CPU and CUDA, or two GPU models, draw
  different, equally distributed, ε from one seed).
- Eval and save always see the unperturbed model: the noise exists only between `before_step` and
  `after_backward`.

Works with every method (W' uses the method's own dense s·ΔW). Not with --fsdp (the weights are shards there).
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..inject import adapter_layers
from ..layer import AdapterLayer
from ..options import Option
from . import register_procedure
from .base import Procedure, TrainingState

ROW_BLOCKS = 8  # σ's row norms are taken over blocks of out / 8 rows: one temporary of 1/8 of W's elements at a time


def noise_generator(seed: int, step: int, module: str, device="cpu") -> torch.Generator:
    digest = hashlib.sha256(f"lorakit:flat:{seed}:{step}:{module}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def merged_row_norms(layer) -> torch.Tensor:
    """‖W'_i‖ = ‖W_i + s·ΔW_i‖ for every output row i (out × 1, in the factors' precision). With low-rank `factors`
    W' is formed a block of rows at a time (W_blk + s·B_blk·A), never whole; a method with its own dense
    `delta_linear` (MoRA, MELoRA) adds W into that one dense s·ΔW."""
    weight = layer.base_weight_linear().detach()
    if type(layer).delta_linear is not AdapterLayer.delta_linear:
        merged = layer.delta_linear().detach()  # a new tensor (block_diag, cat): W is added into it in place
        return torch.linalg.vector_norm(merged.add_(weight), dim=1, keepdim=True)
    a, b = (t.detach() for t in layer.factors())
    b = b * layer.scale
    rows = -(-weight.shape[0] // ROW_BLOCKS)
    norms = [
        torch.linalg.vector_norm(w.to(a.dtype, copy=True).addmm_(b_rows, a), dim=1, keepdim=True)
        for w, b_rows in zip(weight.split(rows), b.split(rows))
    ]
    return torch.cat(norms)


def noise_scale(step: int, total_steps: int) -> float:
    """f(t) = ½ (1 − cos(π t / T)): 0 at the first step, 1 at the end."""
    return 0.5 * (1.0 - math.cos(math.pi * step / max(total_steps, 1)))


@dataclass
class LayerNoise:
    """ε of one layer for one step: ε_ij = σ_i·z_ij with z ~ N(0, 1) from the generator of (seed, step, module)."""

    sigma: torch.Tensor  # out × 1, float32, on the weight's device
    shape: torch.Size  # out × in (nn.Linear layout)
    seed: int
    step: int
    module: str
    filled: torch.Tensor | None = None  # W + ε, once `finish` has made it

    def sample(self, dtype: torch.dtype) -> torch.Tensor:
        """ε in `dtype` on σ's device, one new buffer: the same tensor on every call (every micro-batch, every
        process, a resumed run)."""
        device = self.sigma.device
        noise = torch.empty(self.shape, dtype=dtype, device=device)
        noise.normal_(generator=noise_generator(self.seed, self.step, self.module, device))
        return noise.mul_(self.sigma)  # in place: z drawn in `dtype`, σ_i·z_ij taken in float32, rounded to `dtype`

    def perturbed(self, weight: torch.Tensor) -> torch.Tensor:
        """W + ε, W only read: bit-equal to `weight + self.sample(weight.dtype)`, in one buffer (`fill`'s when it
        was filled for this step, else a new one)."""
        if self.filled is not None:
            return self.filled
        return self.sample(weight.dtype).add_(weight)

    def draw_z(self, buffer: torch.Tensor) -> None:
        """z ~ N(0, 1) into `buffer` (W's shape, dtype and device), from this layer's generator."""
        buffer.normal_(generator=noise_generator(self.seed, self.step, self.module, buffer.device))

    def finish(self, buffer: torch.Tensor, weight: torch.Tensor) -> None:
        """z in `buffer` -> W + σ_i·z, in place (as `sample` then `perturbed`), kept for this step's forwards."""
        self.filled = buffer.mul_(self.sigma).add_(weight)


@register_procedure
class FlatLora(Procedure):
    name = "flat"
    options = {"rho": Option(0.05, float, "noise level ρ (relative to the row norm of W + sΔW)", minimum=0.0)}

    def __init__(self, options: dict):
        super().__init__(options)
        self.buffers: dict[str, torch.Tensor] = {}  # one W + ε per adapted layer, reused every step

    @torch.no_grad()
    def before_step(self, state: TrainingState) -> None:
        factor = noise_scale(state.step, state.total_steps) * self.settings["rho"]
        layers = list(adapter_layers(state.model))
        if factor == 0:
            for _, layer in layers:
                layer.weight_noise = None
            return
        work = []
        for name, layer in layers:
            noise = layer.weight_noise = self.noise(layer, name, factor, state)
            weight = layer.base_weight_linear().detach()
            buffer = self.buffers.get(name)
            if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (noise.shape, weight.dtype, weight.device):
                buffer = self.buffers[name] = torch.empty(noise.shape, dtype=weight.dtype, device=weight.device)
            work.append((noise, buffer, weight))
        threads = torch.get_num_threads()
        parallel = [item for item in work if item[1].device.type == "cpu"] if threads > 1 else []
        if len(parallel) > 1:  # torch draws normals on one core: one layer per thread, each with its own generator
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda item: item[0].draw_z(item[1]), parallel))
        drawn = {id(buffer) for _, buffer, _ in parallel} if len(parallel) > 1 else set()
        for noise, buffer, weight in work:
            if id(buffer) not in drawn:
                noise.draw_z(buffer)
            noise.finish(buffer, weight)

    @torch.no_grad()
    def noise(self, layer, name: str, factor: float, state: TrainingState) -> LayerNoise:
        """The layer's ε for this step, drawn when the layer's forward needs it: σ_i = factor·‖W'_i‖/√in."""
        sigma = merged_row_norms(layer) * (factor / math.sqrt(layer.in_features))
        shape = torch.Size((layer.out_features, layer.in_features))  # nn.Linear layout
        return LayerNoise(sigma.to(torch.float32), shape, state.seed, state.step, name)

    def draw(self, layer, name: str, factor: float, state: TrainingState) -> torch.Tensor:
        """ε for one layer in nn.Linear layout and the base weight's dtype."""
        return self.noise(layer, name, factor, state).sample(layer.base_weight_linear().dtype)

    def after_backward(self, state: TrainingState) -> None:
        for _, layer in adapter_layers(state.model):
            layer.weight_noise = None
