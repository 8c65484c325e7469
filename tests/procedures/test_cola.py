"""Chain of LoRA (lorakit.procedures.cola): knots, fresh links, optimizer reset, the final adapter as one LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_derived_from, fresh_copy, make_config, model_output, perturb_adapters, tiny_llama

import lorakit
from lorakit.models import load_model
from lorakit.procedures.base import TrainingState
from lorakit.procedures.cola import ChainOfLora
from lorakit.training import TrainConfig, train


def test_knots_split_training_into_equal_links():
    assert ChainOfLora({"links": 3}).knots(6) == [2, 4]
    assert ChainOfLora({"links": 3}).knots(10) == [3, 7]
    assert ChainOfLora({"links": 1}).knots(10) == []
    assert ChainOfLora({"links": 20}).knots(4) == [1, 2, 3]  # more links than steps: one per step


@pytest.mark.parametrize("variant", ["lora", "olora", "mini-orthonormal", "loraxs", "melora", "prolora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_knot_keeps_the_model_and_starts_a_fresh_link(variant, dtype, inputs):
    base = tiny_llama().to(dtype)
    model = lorakit.adapt(fresh_copy(base), make_config(variant))
    perturb_adapters(model)
    original = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    params = lorakit.inject.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model_output(model, inputs).float().square().mean().backward()
    optimizer.step()
    before = model_output(model, inputs)
    cola = ChainOfLora({"links": 3})
    cola.check_model(model)
    cola.after_optimizer_step(TrainingState(model, optimizer, None, 1, 6, 0))  # step 2 of 6 done: a knot
    assert cola.link == 1 and not optimizer.state  # Adam's moments and step count start again
    torch.testing.assert_close(model_output(model, inputs), before, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=0)
    for _, layer in lorakit.adapter_layers(model):
        assert layer.frozen_links is not None
        fresh = lorakit.adapt(fresh_copy(base), make_config(variant)).get_submodule(layer.name)
        # the new link starts where a fresh adapter starts (ΔW = 0) but from another random draw
        assert torch.allclose(layer.delta_linear(), torch.zeros_like(layer.delta_linear()), atol=1e-6)
        if variant in ("lora", "melora", "mini-orthonormal", "prolora"):
            drawn = [p for p in layer.trainable_parameters().values() if p.abs().sum() > 0]
            assert drawn and not any(
                torch.equal(p, fresh.trainable_parameters()[n])
                for n, p in layer.trainable_parameters().items()
                if p.abs().sum() > 0
            )
    # the base weights were never written
    for key, value in model.state_dict().items():
        if key in original:
            assert torch.equal(value, original[key]), key
    # merge folds the links too
    lorakit.merge(model)
    torch.testing.assert_close(model_output(model, inputs), before, atol=5e-2 if dtype != torch.float32 else 1e-5, rtol=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(method="mora"), "cannot chain mora"),
        (dict(method="lorta", targets=["q_proj", "k_proj", "v_proj", "o_proj"]), "cannot chain lorta"),
    ],
)
def test_methods_it_cannot_chain_are_refused(settings, message):
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=4, **settings))
    with pytest.raises(lorakit.ConfigError, match=message):
        ChainOfLora({}).check_model(model)


def test_the_refusal_of_an_update_that_is_not_low_rank_names_methods_it_accepts(monkeypatch):
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=4))
    layer = next(layer for _, layer in lorakit.adapter_layers(model))
    monkeypatch.setattr(layer, "export_factors", lambda: None)  # a method with no low-rank form
    with pytest.raises(lorakit.ConfigError, match="is not low rank; use one of") as caught:
        ChainOfLora({}).check_model(model)
    advice = str(caught.value).split("it chains: ")[1]
    named = advice.replace(" or ", ", ").split(", ")
    assert named == ["lora", "olora", "mini", "loraxs", "melora", "prolora"]
    for method in named:  # every method the advice names is accepted
        config = lorakit.AdapterConfig(method=method, r=4, **({"mini_a": 8, "mini_b": 8} if method == "mini" else {}))
        ChainOfLora({}).check_model(lorakit.adapt(tiny_llama(), config))


def test_final_adapter_is_one_lora_of_all_links_and_exports_to_peft(tiny_model_dir, instruction_file, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        data=str(instruction_file),
        out=str(out),
        method="olora",
        procedure="cola:links=3",
        steps=6,
        batch_size=4,
        rank=4,
        lr=1e-2,
        max_length=64,
        quiet=True,
    )
    train(cfg)
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 3 * 2 * 4  # 3 links of OLoRA's rank-2r form
    adapted = lorakit.load_adapter(load_model(str(tiny_model_dir))[0], out / "adapter")  # onto the ORIGINAL base
    lorakit.export_peft(adapted, tmp_path / "peft")
    from transformers import AutoModelForCausalLM

    exported = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "peft")
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["continue", "rewarm"])
def test_the_logged_rate_is_the_rate_each_step_applies(schedule, tiny_model_dir, instruction_file, tmp_path, monkeypatch):
    applied = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        applied.append(self.param_groups[0]["lr"])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    out = tmp_path / "run"
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        data=str(instruction_file),
        out=str(out),
        procedure=f"cola:links=2,schedule={schedule},rewarm_steps=3",
        steps=8,
        schedule="constant",
        batch_size=4,
        rank=4,
        lr=1e-2,
        max_length=64,
        quiet=True,
    )
    train(cfg)
    logged = [r["lr"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "lr" in r]
    assert logged == applied
    # the knot follows step 4; rewarm scales the next 3 steps by 1/4, 2/4, 3/4 ((since + 1) / (rewarm_steps + 1))
    factors = [1, 1, 1, 1, 0.25, 0.5, 0.75, 1] if schedule == "rewarm" else [1] * 8
    assert logged == pytest.approx([1e-2 * f for f in factors], rel=1e-12)


@pytest.mark.parametrize("variant", ["olora", "loraxs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_new_link_starts_from_the_merged_weight(variant, dtype, inputs, tmp_path):
    """Merge, then start a fresh adapter (paper, Algorithm 1): a new link's data-dependent init reads W + ΣΔW, not
    W, and W is not written; a resumed run derives the same from the checkpoint, and the saved adapter (a plain LoRA
    of rank Σ r_j) computes the trained model on the original base."""
    base = tiny_llama().to(dtype)
    model = lorakit.adapt(fresh_copy(base), make_config(variant))
    optimizer = torch.optim.AdamW(lorakit.inject.trainable_parameters(model), lr=1e-3)
    cola = ChainOfLora({"links": 3})
    for step in range(6):
        perturb_adapters(model, seed=step, scale=0.3)  # each link trains
        cola.after_optimizer_step(TrainingState(model, optimizer, None, step, 6, 0))  # knots after steps 2, 4
        if step in (1, 3):
            for _, layer in lorakit.adapter_layers(model):
                a, b = layer.frozen_links
                weight = layer.base_weight_linear().float()
                assert_derived_from(layer, weight + b @ a)
                with pytest.raises(AssertionError):
                    assert_derived_from(layer, weight)  # the links moved W enough to tell
    assert all(torch.equal(layer.base_weight_linear(), fresh_copy(base).get_submodule(layer.name).weight)
               for _, layer in lorakit.adapter_layers(model))
    trained = model_output(model, inputs)
    # resumed: the adapter's stored tensors, then the procedure's state and links (the training loop's order)
    resumed_model = lorakit.adapt(fresh_copy(base), make_config(variant))
    for _, layer in lorakit.adapter_layers(resumed_model):
        layer.load_tensors(model.get_submodule(layer.name).stored_tensors())
    resumed = ChainOfLora({"links": 3})
    resumed.load_state_dict(cola.state_dict(), cola.state_tensors(model), resumed_model)
    assert torch.equal(model_output(resumed_model, inputs), trained)
    # the checkpoint's way: the live link's adapter file (strict load onto the original base; it keeps no sketch of
    # factors it cannot rebuild), then the procedure's links and their sketch
    lorakit.save_adapter(model, tmp_path / "checkpoint")
    modules = json.loads((tmp_path / "checkpoint" / "adapter.json").read_text())["modules"]
    assert all(info.get("derived_from_links") and "update_sketch" not in info for info in modules.values())
    from_file = lorakit.load_adapter(fresh_copy(base), tmp_path / "checkpoint")
    ChainOfLora({"links": 3}).load_state_dict(cola.state_dict(), cola.state_tensors(model), from_file)
    assert torch.equal(model_output(from_file, inputs), trained)
    # another base (here: a tampered sketch stands for one whose factors rotate) is refused, in one line
    tampered = {k: v * 2 if k.endswith("update_sketch") else v for k, v in cola.state_tensors(model).items()}
    with pytest.raises(lorakit.BaseModelMismatchError, match="resume on the base the run was trained on"):
        ChainOfLora({"links": 3}).load_state_dict(cola.state_dict(), tampered, lorakit.adapt(fresh_copy(base),
                                                                                         make_config(variant)))
    # the final adapter: one plain LoRA of rank Σ r_j on the original base, the trained model up to float rounding
    lorakit.save_adapter(resumed_model, tmp_path / "adapter", layers=resumed.layers_to_save(resumed_model))
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["method"] == "lora"
    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "adapter")
    difference = (model_output(loaded, inputs).float() - trained.float()).abs().max().item()
    print(f"{variant} {dtype}: saved final adapter vs trained model, max |logit difference| {difference:.2e}")
    assert difference <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("outer", ["orthonormal", "normal", "qr"])
def test_lora_mini_chain_is_saved_compact(outer, inputs, tmp_path):
    """Links share the outer matrices, so the chain is one LoRA-Mini of inner rank Σ r_j: a small file that
    computes the trained model, also after the chain went through a checkpoint (resume)."""
    base = tiny_llama()
    config = make_config("mini-orthonormal", mini_outer=outer, rslora=True)
    model = lorakit.adapt(fresh_copy(base), config)
    optimizer = torch.optim.AdamW(lorakit.inject.trainable_parameters(model), lr=1e-3)
    cola = ChainOfLora({"links": 3})
    for step in range(6):
        perturb_adapters(model, seed=step, scale=0.05)
        cola.after_optimizer_step(TrainingState(model, optimizer, None, step, 6, 0))
    perturb_adapters(model, seed=7, scale=0.05)  # the last link trained too
    if outer == "qr":  # the shared bases of W also span those of W + ΣΔW: the paper's fresh link on the merged W
        for _, layer in lorakit.adapter_layers(model):
            a, b = layer.frozen_links
            assert_derived_from(layer, layer.base_weight_linear() + b @ a)
    trained = model_output(model, inputs)
    # a resumed procedure (state and tensors from the checkpoint) saves the same adapter
    resumed = ChainOfLora({"links": 3})
    resumed.load_state_dict(cola.state_dict(), cola.state_tensors(model), model)
    lorakit.save_adapter(model, tmp_path / "adapter", layers=resumed.layers_to_save(model))
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["method"] == "mini" and meta["config"]["r"] == 3 * config.r  # 3 links of inner rank r
    stored = sum(t.numel() for t in lorakit.read_adapter(tmp_path / "adapter")[2].values())
    assert stored == len(meta["modules"]) * 3 * config.r * (config.mini_a + config.mini_b)  # inner matrices only
    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "adapter")
    torch.testing.assert_close(model_output(loaded, inputs), trained, atol=1e-5, rtol=1e-5)
