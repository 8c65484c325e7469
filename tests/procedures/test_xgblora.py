"""XGBLoRA (lorakit.procedures.xgblora): seeded block choice, only picked blocks train, the exact regulariser
gradient, exact folding, the final adapter (per-module rank, reload, PEFT export) and the trainable-per-round
figure."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    assert_derived_from,
    fresh_copy,
    make_config,
    model_output,
    perturb_adapters,
    tiny_bert,
    tiny_llama,
)
from safetensors.torch import load_file

import lorakit
from lorakit.inject import trainable_parameters
from lorakit.models import load_model
from lorakit.optim import LoraRite
from lorakit.procedures import PROCEDURES, parse_procedure
from lorakit.procedures.base import TrainingState
from lorakit.procedures.xgblora import XGBLora, picked_blocks
from lorakit.training import TrainConfig, distributed, train


def adapted(blocks=4, variant="lora", dtype=torch.float32, **config):
    base = tiny_llama(num_hidden_layers=blocks).to(dtype)
    return base, lorakit.adapt(fresh_copy(base), make_config(variant, **config))


def block_of(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.N....


def snapshot(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": p.detach().clone()
        for name, layer in lorakit.adapter_layers(model)
        for key, p in layer.trainable_parameters().items()
    }


def run_steps(model, procedure, optimizer, steps, total, seed=0, inputs=None, check=None):
    """The loop's order of hooks around real backward passes; `check(step, before)` runs before each fold."""
    moment = TrainingState(model, optimizer, None, 0, total, seed)
    procedure.on_train_begin(moment)
    ids = inputs if inputs is not None else torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    for step in steps:
        moment.step = step
        before = snapshot(model)
        procedure.before_step(moment)
        model_output(model, ids).float().square().mean().backward()
        procedure.after_backward(moment)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if check is not None:
            check(step, before)
        procedure.after_optimizer_step(moment)
    return moment


def test_options_rounds_and_steps():
    assert PROCEDURES["xgblora"] is XGBLora
    assert parse_procedure("xgblora:rounds=3,layers=2,lam=0.1") == ("xgblora", {"rounds": 3, "layers": 2, "lam": 0.1})
    assert XGBLora({"rounds": 3}).round_starts(6) == [0, 2, 4]
    assert XGBLora({"rounds": 3}).round_starts(10) == [0, 3, 7]
    assert XGBLora({"rounds": 20}).round_starts(4) == [0, 1, 2, 3]  # more rounds than steps: one step each
    assert XGBLora({"round_steps": 4}).round_starts(10) == [0, 4, 8]  # κ steps each, the last one shorter
    assert XGBLora({"round_steps": 4}).round_of(9, 10) == 2 and XGBLora({"rounds": 3}).round_of(3, 6) == 1
    with pytest.raises(lorakit.ConfigError, match="rounds .* or round_steps .*, not both"):
        XGBLora({"rounds": 2, "round_steps": 3})
    with pytest.raises(lorakit.ConfigError, match="shrinkage must be > 0"):
        XGBLora({"shrinkage": 0.0})
    with pytest.raises(lorakit.ConfigError, match="layers=0 of xgblora is invalid"):
        parse_procedure("xgblora:layers=0")


def test_block_choice_is_seeded_by_seed_and_round():
    _, model = adapted(blocks=8)
    first, second = XGBLora({"layers": 3}), XGBLora({"layers": 3})
    rounds = [first.picked_modules(model, 5, j) for j in range(8)]
    # deterministic: another procedure object and another copy of the model pick the same modules
    _, again = adapted(blocks=8)
    assert rounds == [second.picked_modules(again, 5, j) for j in range(8)]
    blocks = [sorted({block_of(name) for name in picks}) for picks in rounds]
    assert all(len(b) == 3 for b in blocks)
    assert len({tuple(b) for b in blocks}) > 1  # differs across rounds
    assert [picked_blocks(6, j, 8, 3) for j in range(8)] != blocks  # and across seeds
    # every adapter layer of a picked block is picked, nothing else
    for picks, chosen in zip(rounds, blocks):
        assert picks == {name for name, _ in lorakit.adapter_layers(model) if block_of(name) in chosen}
    assert picked_blocks(0, 0, 8, 3) == [3, 6, 7]  # pinned: a resumed run depends on the same draw


@pytest.mark.parametrize("optimizer", ["adamw", "rite"])
def test_only_the_picked_blocks_train(optimizer):
    _, model = adapted(blocks=4, r=2)
    params = trainable_parameters(model)
    # weight decay would move any parameter the optimizer steps, even one with a zero gradient
    opt = (
        torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        if optimizer == "adamw"
        else LoraRite(model, lr=1e-2, weight_decay=0.1)
    )
    xgb = XGBLora({"round_steps": 2, "layers": 1, "lam": 0.01})
    seen = Counter()

    def check(step, before):
        picks = xgb.picks
        after = snapshot(model)
        for key in after:
            module = key.rsplit(".", 1)[0]
            if module in picks:
                seen["changed"] += not torch.equal(after[key], before[key])
            else:
                assert torch.equal(after[key], before[key]), (step, key)  # bit-identical: no step at all
                if key.endswith(".B"):
                    assert not after[key].any()  # and at init: B = 0, ΔW = 0

    run_steps(model, xgb, opt, range(6), 6, check=check)
    assert seen["changed"] > 0


@pytest.mark.parametrize(("loss_scale", "max_grad_norm"), [(None, 0.0), (1024.0, 0.0), (None, 0.05), (1024.0, 0.05)])
def test_regulariser_gradient_is_exact(inputs, loss_scale, max_grad_norm):
    lam = 0.37
    _, model = adapted(blocks=3, r=2)
    model.double()
    perturb_adapters(model)
    reference = fresh_copy(model)
    xgb = XGBLora({"layers": 2, "lam": lam, "max_grad_norm": max_grad_norm})
    # fp16 (Accelerate): the optimizer carries the GradScaler; both loops unscale before after_backward (lorakit
    # train explicitly, the Trainer through its gradient norm)
    scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale) if loss_scale else None
    optimizer = torch.optim.AdamW(trainable_parameters(model))
    moment = TrainingState(model, SimpleNamespace(scaler=scaler, param_groups=optimizer.param_groups), None, 0, 4, 0)
    xgb.on_train_begin(moment)
    loss = model_output(model, inputs).square().mean()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    xgb.after_backward(moment)
    # autograd of loss + λ(‖A‖² + ‖B‖²) over the picked layers' factors
    penalty = sum(
        layer.A.square().sum() + layer.B.square().sum()
        for name, layer in lorakit.adapter_layers(reference)
        if name in xgb.picks
    )
    (model_output(reference, inputs).square().mean() + lam * penalty).backward()
    expected = dict(lorakit.adapter_layers(reference))
    assert xgb.picks and len(xgb.picks) < len(expected)
    # then clipped: the picked layers' gradients of that objective, and only theirs, to the global norm
    norm = torch.cat([p.grad.flatten() for n in xgb.picks for p in expected[n].trainable_parameters().values()]).norm()
    factor = min(1.0, max_grad_norm / (norm.item() + 1e-6)) if max_grad_norm else 1.0
    assert factor < 0.2 if max_grad_norm else factor == 1.0  # the clipping bites
    for name, layer in lorakit.adapter_layers(model):
        for key, param in layer.trainable_parameters().items():
            if name in xgb.picks:
                reference_grad = getattr(expected[name], key).grad * factor
                torch.testing.assert_close(param.grad, reference_grad, rtol=1e-12, atol=1e-12)
            else:
                assert param.grad is None


def regulariser_steps(model, lam: float, steps: int, lr: float = 1e-2) -> None:
    """`steps` optimizer steps on the regulariser alone: the task gradient is 0 (loss = 0 · output), no weight decay."""
    xgb = XGBLora({"rounds": 1, "layers": 2, "lam": lam})  # one round, both blocks of the 2-block model
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=0.0)
    moment = TrainingState(model, optimizer, None, 0, steps + 1, 0)  # the round ends after the steps
    xgb.on_train_begin(moment)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    for step in range(steps):
        moment.step = step
        xgb.before_step(moment)
        (model_output(model, ids).sum() * 0.0).backward()
        xgb.after_backward(moment)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        xgb.after_optimizer_step(moment)


def update_ratio(model) -> float:
    """max over layers of ‖s·ΔW‖ / ‖W‖."""
    norm = torch.linalg.matrix_norm
    return max(
        (norm(layer.delta_linear().double()) / norm(layer.base_layer.weight.double())).item()
        for _, layer in lorakit.adapter_layers(model)
    )


@pytest.mark.parametrize("variant", ["lora", "olora", "loraxs", "mini-orthonormal"])
def test_the_regulariser_alone_keeps_the_update_at_zero(variant):
    """λ(‖A‖² + ‖B‖²) is smallest at ΔW = −s·B0·A0 for OLoRA: its booster is regularised as A − A0, B − B0."""
    _, model = adapted(blocks=2, variant=variant, r=2)
    assert update_ratio(model) <= 1e-6  # OLoRA: 6.4e-8, the rounding of s·(B0·A0 − B0·A0)
    before = snapshot(model)
    regulariser_steps(model, lam=1e-3, steps=10)
    assert update_ratio(model) <= 1e-6  # the old OLoRA regulariser (λ‖A‖² + λ‖B‖²): 2.09
    if variant in ("lora", "mini-orthonormal"):  # A (A_in) is not at the minimum: the regulariser did act
        assert any(not torch.equal(value, before[key]) for key, value in snapshot(model).items())


def test_the_regulariser_pulls_an_olora_booster_back_to_its_start():
    _, model = adapted(blocks=2, variant="olora", r=2)
    perturb_adapters(model)
    offsets = {name: (layer.A - layer.A0).norm().item() for name, layer in lorakit.adapter_layers(model)}
    regulariser_steps(model, lam=1e-3, steps=10, lr=1e-3)
    for name, layer in lorakit.adapter_layers(model):
        assert (layer.A - layer.A0).norm().item() < offsets[name]


@pytest.mark.parametrize("variant", ["lora", "olora", "loraxs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folding_keeps_the_model_and_the_base_weights(variant, dtype, inputs):
    base, model = adapted(blocks=3, variant=variant, dtype=dtype)
    original = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    xgb = XGBLora({"rounds": 3, "layers": 1})
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    run_steps(model, xgb, opt, range(1), 6, inputs=inputs)  # one step of round 0: its booster trains
    finished = xgb.picked_modules(model, 0, 0)
    perturb_adapters(model)  # a larger booster than one step makes, so that folding it visibly matters
    for name, layer in lorakit.adapter_layers(model):
        if name not in finished:  # outside the booster ΔW stays 0 (as the previous test shows)
            layer.initialize()
    before = model_output(model, inputs)
    moment = TrainingState(model, opt, None, 1, 6, 0)
    assert opt.state
    xgb.after_optimizer_step(moment)  # step 2 of 6 done: round 0 ends
    assert xgb.round == 1 and not opt.state  # Adam's moments and step count start again
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(model_output(model, inputs), before, atol=tolerance, rtol=0)
    for name, layer in lorakit.adapter_layers(model):
        assert (layer.frozen_links is not None) == (name in finished)
        delta = layer.delta_linear()
        assert torch.allclose(delta, torch.zeros_like(delta), atol=1e-6)  # every live booster starts at ΔW = 0
    for key, value in model.state_dict().items():
        if key in original:
            assert torch.equal(value, original[key]), key  # the base weights were never written
    lorakit.merge(model)
    torch.testing.assert_close(model_output(model, inputs), before, atol=5 * tolerance, rtol=0)


@pytest.mark.parametrize("variant", ["olora", "loraxs"])
def test_a_new_booster_starts_from_the_merged_weight(variant, inputs):
    """A fresh booster of a module that already received one is initialised on W + its folded boosters (OLoRA's
    A0, B0 = the thin-QR factors of that sum; LoRA-XS's SVD of it), as is a resumed run's."""
    base, model = adapted(blocks=2, variant=variant)
    xgb = XGBLora({"rounds": 4, "layers": 2})  # both blocks in every round
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    moment = TrainingState(model, opt, None, 0, 4, 0)
    xgb.on_train_begin(moment)
    for step in range(2):
        perturb_adapters(model, seed=step, scale=0.3)  # the round's booster trained
        moment.step = step
        xgb.after_optimizer_step(moment)  # round `step` ends
        for _, layer in lorakit.adapter_layers(model):
            a, b = layer.frozen_links
            assert_derived_from(layer, layer.base_weight_linear() + b @ a)
            with pytest.raises(AssertionError):
                assert_derived_from(layer, layer.base_weight_linear())
    perturb_adapters(model, seed=5, scale=0.3)
    trained = model_output(model, inputs)
    resumed_model = lorakit.adapt(fresh_copy(base), make_config(variant))
    for _, layer in lorakit.adapter_layers(resumed_model):
        layer.load_tensors(model.get_submodule(layer.name).stored_tensors())
    XGBLora({"rounds": 4, "layers": 2}).load_state_dict(xgb.state_dict(), xgb.state_tensors(model), resumed_model)
    torch.testing.assert_close(model_output(resumed_model, inputs), trained, atol=1e-6, rtol=0)


def test_shrinkage_folds_a_fraction_of_the_booster():
    _, model = adapted(blocks=2)
    perturb_adapters(model)
    xgb = XGBLora({"rounds": 2, "layers": 2, "shrinkage": 0.25})
    deltas = {name: layer.delta_linear().detach().clone() for name, layer in lorakit.adapter_layers(model)}
    opt = torch.optim.AdamW(trainable_parameters(model))
    xgb.after_optimizer_step(TrainingState(model, opt, None, 0, 2, 0))
    for name, layer in lorakit.adapter_layers(model):
        torch.testing.assert_close(layer.total_delta_linear(), 0.25 * deltas[name], atol=1e-6, rtol=1e-5)


def test_final_adapter_ranks_reload_and_peft_export(tmp_path, inputs):
    peft = pytest.importorskip("peft")
    rank, rounds = 2, 5
    base, model = adapted(blocks=4, r=rank)
    xgb = XGBLora({"rounds": rounds, "layers": 1})
    opt = torch.optim.AdamW(trainable_parameters(model), lr=5e-2)
    run_steps(model, xgb, opt, range(rounds), rounds, seed=1)
    assert xgb.picks == set()  # the last booster is folded too
    times = Counter(name for j in range(rounds) for name in xgb.picked_modules(model, 1, j))
    assert len(set(times.values())) > 1  # some modules picked more often than others: per-module ranks
    trained = model_output(model, inputs)
    layers = xgb.layers_to_save(model)
    assert set(layers) == set(times)  # modules never picked have rank 0 and are left out
    for name, lora in layers.items():
        assert lora.r == lora.config.alpha == rank * times[name]  # each module its own rank, scale 1: no padding
    lorakit.save_adapter(model, tmp_path / "adapter", layers=layers)
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    saved_ranks = {name: info.get("r", meta["config"]["r"]) for name, info in meta["modules"].items()}
    assert meta["method"] == "lora" and saved_ranks == {name: rank * n for name, n in times.items()}
    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "adapter")  # the ORIGINAL base, strict check
    assert {name: layer.r for name, layer in lorakit.adapter_layers(loaded)} == saved_ranks
    torch.testing.assert_close(model_output(loaded, inputs), trained, atol=1e-5, rtol=1e-5)
    lorakit.export_peft(loaded, tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["rank_pattern"]  # the ranks differ: PEFT gets them as a pattern
    exported = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(exported(inputs).logits, trained, atol=1e-4, rtol=1e-4)
    back = lorakit.import_peft(fresh_copy(base), tmp_path / "peft")  # and back, ranks and all
    assert {name: layer.r for name, layer in lorakit.adapter_layers(back)} == saved_ranks
    torch.testing.assert_close(model_output(back, inputs), trained, atol=1e-5, rtol=1e-5)


class ScaledRuntime(distributed.AccelerateRuntime):
    """Accelerate's native fp16 loss scaling with a CPU GradScaler (scale 1024); the forward stays float32 (no fp16
    autocast on CPU), so the run differs from one without the scaler only in the scaling."""

    def __init__(self, precision):
        super().__init__(precision)
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # handed to the optimizer's wrapper

    def prepare(self, model, optimizer):
        prepared = super().prepare(model, optimizer)
        self.accelerator.native_amp = True  # after prepare (no autocast wrapper): unscale_gradients now acts
        return prepared

    def autocast(self):
        return contextlib.nullcontext()


def test_fp16_loss_scale_leaves_the_regulariser_at_its_weight(tiny_model_dir, instruction_file, tmp_path, monkeypatch):
    settings = dict(
        model=str(tiny_model_dir),
        data=str(instruction_file),
        procedure="xgblora:rounds=1,layers=1,lam=0.001",
        steps=6,
        batch_size=2,
        rank=2,
        lr=1e-2,
        max_length=64,
        quiet=True,
        precision="fp16",  # on CPU: no scaler, float32 compute
    )
    train(TrainConfig(out=str(tmp_path / "plain"), **settings))
    monkeypatch.setattr(distributed, "AccelerateRuntime", ScaledRuntime)
    train(TrainConfig(out=str(tmp_path / "scaled"), **settings))
    one, two = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("plain", "scaled"))
    assert one.keys() == two.keys() and max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6


def test_trainable_per_round_in_the_summary(tiny_model_dir, instruction_file, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        data=str(instruction_file),
        out=str(out),
        procedure="xgblora:rounds=3,layers=1",
        steps=3,
        batch_size=2,
        rank=1,
        lr=1e-2,
        max_length=64,
        quiet=True,
    )
    summary = train(cfg)
    model = lorakit.adapt(load_model(str(tiny_model_dir))[0], cfg.adapter_config())
    blocks = Counter()
    for name, layer in lorakit.adapter_layers(model):
        blocks[block_of(name)] += layer.in_features + layer.out_features  # rank 1: A and B
    assert len(set(blocks.values())) == 1 and len(blocks) > 1  # one block's booster, fewer than all adapters
    assert summary["procedure"].endswith(f" trainable_per_round={blocks[0]}")
    assert summary["trainable_parameters"] == sum(blocks.values())  # the loop counts every adapter layer
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert all(info.get("r", meta["config"]["r"]) <= 3 for info in meta["modules"].values())  # 1 × at most 3 rounds


def test_resume_in_the_middle_of_a_round(tiny_model_dir, instruction_file, tmp_path):
    """The generic resume test restarts at a round boundary; this one inside round 1, with round 0 folded."""
    settings = dict(
        model=str(tiny_model_dir),
        data=str(instruction_file),
        procedure="xgblora:round_steps=3,layers=1,lam=0.01",
        steps=6,
        batch_size=2,
        rank=2,
        lr=1e-2,
        max_length=64,
        quiet=True,
        save_every=2,
        keep_checkpoints=5,
    )
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(TrainConfig(out=str(whole), **settings))
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "adapter")
    (resumed / "summary.json").unlink()
    state = json.loads((resumed / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["procedure"] == {"round": 1}
    train(TrainConfig(out=str(resumed), resume=True, **settings))
    one, two = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (whole, resumed))
    assert one.keys() == two.keys() and max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6


@pytest.mark.parametrize(
    ("model", "settings", "message"),
    [
        (tiny_llama, dict(method="mora"), "cannot boost mora"),
        (tiny_llama, dict(method="lorta", targets=["q_proj", "k_proj", "v_proj", "o_proj"]), "cannot boost lorta"),
        (tiny_llama, dict(), r"layers=3 but the adapted model has 2 transformer blocks"),
        (tiny_bert, dict(), r"pooler.dense is in none .* --targets 'encoder\\\.layer\\\.\\d\+\\\.\.\*'"),
    ],
)
def test_models_it_cannot_boost_are_refused(model, settings, message):
    adapted_model = lorakit.adapt(model(), lorakit.AdapterConfig(r=4, **settings))
    with pytest.raises(lorakit.ConfigError, match=message):
        XGBLora({"layers": 3}).check_model(adapted_model)
