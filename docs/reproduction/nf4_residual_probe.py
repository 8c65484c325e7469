"""How much of nf4's loss a LoftQ-style start could win back on SmolLM2-135M (docs/reproduction.md, QLoRA quality).

LoftQ (Li et al. 2023, arXiv 2310.08659) starts the adapter at the best rank-r approximation of the quantization
residual W - Q(W), so that Q(W) + B·A is closer to W than Q(W) alone; with one alternation and the base left as it
is, that is PEFT's `replace_lora_weights_loftq`. This probe puts Q(W) + SVD_r(W - Q(W)) into every linear layer
but the head (bitsandbytes nf4, blocksize 64, double quantization: `lorakit.quantize.quantized_copy`) and prints
the held-out eval loss of stdlib-docstrings (48 examples, max length 128), for the float32 base, the nf4 base and
r = 16 and 64. About 2.5 minutes on 2 CPU cores.

python docs/reproduction/nf4_residual_probe.py
"""

import torch

from lorakit.data import load_examples
from lorakit.models import load_model
from lorakit.quantize import quantized_copy
from lorakit.training.evaluate import evaluate_loss

NF4 = {"scheme": "nf4", "blocksize": 64, "double_quant": True}


@torch.no_grad()
def main() -> None:
    model, tokenizer = load_model(dtype=torch.float32)
    model.eval()
    examples = load_examples("stdlib-docstrings", tokenizer, 128, split="eval")[0][:48]

    def eval_loss() -> float:
        return evaluate_loss(model, examples, 4, tokenizer.pad_token_id or 0, torch.device("cpu"))["eval_loss"]

    print(f"float32 base: {eval_loss():.4f}")
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not head]
    original = [m.weight.detach().clone() for m in linears]
    quantized = [quantized_copy(w, NF4) for w in original]
    for module, q in zip(linears, quantized):
        module.weight.copy_(q)
    print(f"nf4 base: {eval_loss():.4f}")
    residuals = [torch.linalg.svd(w - q, full_matrices=False) for w, q in zip(original, quantized)]
    for rank in (16, 64):
        for module, q, (u, s, vh) in zip(linears, quantized, residuals):
            module.weight.copy_(q + (u[:, :rank] * s[:rank]) @ vh[:rank])
        left = sum(float((w - m.weight).norm() ** 2) for w, m in zip(original, linears)) / sum(
            float((w - q).norm() ** 2) for w, q in zip(original, quantized)
        )
        print(f"nf4 + rank-{rank} residual: {eval_loss():.4f} (residual energy left {left:.3f})")


if __name__ == "__main__":
    main()
