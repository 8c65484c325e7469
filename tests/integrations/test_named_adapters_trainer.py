"""transformers' Trainer trains one named adapter while another stays active and frozen; the save is that adapter."""

import torch
from conftest import make_config, perturb_adapters, tiny_llama
from trainer_helpers import INPUTS, adapted, frozen, train

import lorakit


def test_trainer_trains_the_named_adapter_only_and_saves_it(tmp_path):
    model = adapted("lora")
    perturb_adapters(model)  # adapter "default": already trained, now frozen under the new one
    lorakit.adapt(model, make_config("lora", seed=9), name="task")
    lorakit.set_active(model, ["default", "task"], train="task")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    still = frozen(model)
    train(model, tmp_path / "out", max_steps=3, save_steps=3)
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".adapters.task." in name for name in changed)
    assert all(torch.equal(after[name], value) for name, value in still.items())  # "default" and the base
    # the checkpoint's adapter is "task", which alone on the base equals the model with "default" switched off
    saved = lorakit.load_adapter(tiny_llama(), tmp_path / "out" / "checkpoint-3").eval()
    lorakit.set_active(model, "task")
    with torch.no_grad():
        torch.testing.assert_close(saved(INPUTS).logits, model.eval()(INPUTS).logits, rtol=0, atol=1e-6)
