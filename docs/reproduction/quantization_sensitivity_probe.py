"""Where nf4's loss on SmolLM2-135M comes from (docs/reproduction.md, QLoRA quality): the held-out eval loss of the
untrained base under each quantization scheme, and with nf4 applied to one kind of layer, or one decoder block,
at a time (the rest left in float32).

The eval set is the one `lorakit compare` scores (stdlib-docstrings, 48 examples, max length 128). Each linear
layer but the head is replaced by its quantized-then-dequantized weight (`lorakit.quantize.quantized_copy`, the
same rounding as `--quantize`); no adapter is trained. int8 rounds the weights only: `--quantize int8`'s forward
(LLM.int8()) also rounds each input row to int8. About 15 minutes on 2 CPU cores beside two training runs
(docs/reproduction/quantization-sensitivity.md holds the output of 2026-12-08).

python docs/reproduction/quantization_sensitivity_probe.py
"""

import torch

from lorakit.data import load_examples
from lorakit.models import load_model
from lorakit.quantize import quantized_copy
from lorakit.training.evaluate import evaluate_loss

SCHEMES = {
    "nf4, blocksize 64, double quantization (--quantize nf4)": {"scheme": "nf4", "blocksize": 64, "double_quant": True},
    "nf4, blocksize 64": {"scheme": "nf4", "blocksize": 64, "double_quant": False},
    "nf4, blocksize 32, double quantization": {"scheme": "nf4", "blocksize": 32, "double_quant": True},
    "fp4, blocksize 64, double quantization (--quantize fp4)": {"scheme": "fp4", "blocksize": 64, "double_quant": True},
    "int8, the weights only (--quantize int8 rounds the inputs too)": {"scheme": "int8"},
}
NF4 = SCHEMES["nf4, blocksize 64, double quantization (--quantize nf4)"]


@torch.no_grad()
def main() -> None:
    model, tokenizer = load_model(dtype=torch.float32)
    model.eval()
    examples = load_examples("stdlib-docstrings", tokenizer, 128, split="eval")[0][:48]
    head = model.get_output_embeddings()
    linears = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head}
    original = {name: m.weight.detach().clone() for name, m in linears.items()}

    def eval_loss(chosen: dict) -> float:
        """Eval loss with the layers in `chosen` (name -> settings) quantized and every other one in float32."""
        for name, module in linears.items():
            module.weight.copy_(quantized_copy(original[name], chosen[name]) if name in chosen else original[name])
        return evaluate_loss(model, examples, 4, tokenizer.pad_token_id or 0, torch.device("cpu"))["eval_loss"]

    base = eval_loss({})
    print(f"float32 base: {base:.4f}\n\n| quantization of every linear layer but the head | eval loss | over float32 |")
    print("|---|---|---|")
    for label, settings in SCHEMES.items():
        try:
            loss = eval_loss(dict.fromkeys(linears, settings))
        except (ValueError, RuntimeError) as error:  # a blocksize this bitsandbytes does not offer
            print(f"| {label} | not available: {str(error).splitlines()[0]} | |")
            continue
        print(f"| {label} | {loss:.4f} | {100 * (loss / base - 1):+.1f}% |")

    kinds = sorted({name.rsplit(".", 1)[-1] for name in linears})
    print("\n| nf4 on one kind of layer only (all blocks) | eval loss | over float32 |\n|---|---|---|")
    for kind in kinds:
        loss = eval_loss({name: NF4 for name in linears if name.endswith("." + kind)})
        print(f"| {kind} | {loss:.4f} | {100 * (loss / base - 1):+.1f}% |")

    blocks = sorted({int(name.split(".layers.")[1].split(".")[0]) for name in linears})
    print("\n| nf4 on one decoder block only | eval loss | over float32 |\n|---|---|---|")
    for block in blocks:
        loss = eval_loss({name: NF4 for name in linears if f".layers.{block}." in name})
        print(f"| {block} | {loss:.4f} | {100 * (loss / base - 1):+.1f}% |")


if __name__ == "__main__":
    main()
