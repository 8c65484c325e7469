"""Hot swap (lorakit.hotswap): one adapter's tensors replaced in place, with no new module and no recompile."""

import pytest
import torch
from conftest import make_config, perturb_adapters, tiny_llama

import lorakit

IDS = torch.arange(12).reshape(2, 6) % 64


def saved(tmp_path, variant, seed, perturb_seed, name="x"):
    model = lorakit.adapt(tiny_llama(), make_config(variant, seed=seed))
    perturb_adapters(model, seed=perturb_seed)
    lorakit.save_adapter(model, tmp_path / name)
    with torch.no_grad():
        return tmp_path / name, model.eval()(IDS).logits


@pytest.mark.parametrize("variant", ["lora", "mini-orthonormal", "loraxs", "lorta"])
def test_swap_equals_loading_the_new_file(variant, tmp_path):
    """Another seed too: LoRA-Mini's outer matrices come from the seed, and are rebuilt in place."""
    first, _ = saved(tmp_path, variant, seed=1, perturb_seed=2, name="first")
    second, expected = saved(tmp_path, variant, seed=5, perturb_seed=9, name="second")
    model = lorakit.load_adapter(tiny_llama(), first).eval()
    modules = {name: id(module) for name, module in model.named_modules()}
    lorakit.hotswap_adapter(model, second, "default")
    assert {name: id(module) for name, module in model.named_modules()} == modules  # nothing rebuilt
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-6)


def test_a_compiled_model_runs_the_swapped_adapter_without_recompiling(tmp_path):
    first, _ = saved(tmp_path, "lora", seed=1, perturb_seed=2, name="first")
    second, expected = saved(tmp_path, "lora", seed=3, perturb_seed=4, name="second")
    model = lorakit.load_adapter(tiny_llama(), first).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled(IDS)
        with torch._dynamo.config.patch(error_on_recompile=True):
            lorakit.hotswap_adapter(model, second, "default")
            got = compiled(IDS).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_swap_that_does_not_fit_is_refused_and_changes_nothing(tmp_path):
    first, first_logits = saved(tmp_path, "lora", seed=1, perturb_seed=2, name="first")
    other_rank = lorakit.adapt(tiny_llama(), make_config("lora", r=8))
    lorakit.save_adapter(other_rank, tmp_path / "r8")
    other_method, _ = saved(tmp_path, "olora", seed=1, perturb_seed=2, name="olora")
    other_base = lorakit.adapt(tiny_llama(seed=7), make_config("lora"))
    lorakit.save_adapter(other_base, tmp_path / "base7")
    model = lorakit.load_adapter(tiny_llama(), first).eval()
    with pytest.raises(lorakit.ConfigError, match="another config"):
        lorakit.hotswap_adapter(model, tmp_path / "r8", "default")
    with pytest.raises(lorakit.ConfigError, match="same method and targets"):
        lorakit.hotswap_adapter(model, other_method, "default")
    with pytest.raises(lorakit.BaseModelMismatchError):
        lorakit.hotswap_adapter(model, tmp_path / "base7", "default")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, first_logits, rtol=0, atol=1e-6)


def test_swap_one_of_several_and_the_mixed_batch_follows(tmp_path):
    first, _ = saved(tmp_path, "lora", seed=1, perturb_seed=2, name="first")
    second, expected = saved(tmp_path, "lora", seed=3, perturb_seed=4, name="second")
    model = lorakit.load_adapter(tiny_llama(), first).eval()
    lorakit.load_adapter(model, first, name="b")
    with torch.no_grad():
        model(IDS, adapter_names=["b", "default"])  # stacks cached
        lorakit.hotswap_adapter(model, second, "b")
        mixed = model(IDS, adapter_names=["b", "default"]).logits
    torch.testing.assert_close(mixed[0], expected[0], rtol=0, atol=1e-5)
