"""IncreLoRA (lorakit.procedures.increlora): importance, smoothing, growth under an exact budget, reserves,
the orthogonality regulariser, one AdamW group per growth, the saved adapter, resume and DDP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, tiny_llama
from safetensors.torch import load_file

import lorakit
from lorakit.procedures import PROCEDURES, parse_procedure
from lorakit.procedures.base import TrainingState
from lorakit.procedures.increlora import (
    RESERVE_E,
    UNTRAINED,
    IncreLora,
    allocate,
    default_increment,
    importance,
    orthogonality,
    smooth,
)

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # 8 modules in the 2-layer tiny Llama


def adapted(rank=6, alpha=12.0, dropout=0.0, targets=TARGETS, method="lora", **config):
    config = lorakit.AdapterConfig(method=method, r=rank, alpha=alpha, targets=targets, dropout=dropout, **config)
    return lorakit.adapt(tiny_llama(), config)


def batch(step: int, rows: int = 2, offset: int = 0, span: int = VOCAB) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(offset, offset + span, (rows, 12), generator=gen)


def procedure(**options) -> IncreLora:
    settings = dict(target_rank=2, warmup=0, interval=1, top_h=3, rewarm_steps=2)
    settings.update(options)
    return IncreLora(parse_procedure("increlora:" + ",".join(f"{k}={v}" for k, v in settings.items()))[1])


def begin(model, proc, *, total=8, lr=1e-2, weight_decay=0.0, step=0):
    optimizer = torch.optim.AdamW(lorakit.inject.trainable_parameters(model), lr=lr, weight_decay=weight_decay)
    state = TrainingState(model, optimizer, None, step, total, 0)
    proc.check_model(model)
    proc.on_train_begin(state)
    return state


def run_steps(model, proc, state, stop, data=batch):
    """The loop's order of hooks for steps state.step .. stop - 1 (one process, no scheduler)."""
    for step in range(state.step, stop):
        state.step = step
        proc.before_step(state)
        ids = data(step)
        model(ids, labels=ids).loss.backward()
        proc.after_backward(state)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        proc.after_optimizer_step(state)
    state.step = stop


def dense_update(proc, module) -> torch.Tensor:
    """ΔW = (alpha/ranknum)·B·diag(E)·A from the procedure's true factors, every component."""
    data = module.data
    c = module.layer.config.alpha / module.active
    return c * data["Bt"].T @ (data["E"][:, None] * data["A"])


# ----------------------------------------------------------------------------------------------- options
def test_registry_options_and_refusals():
    assert PROCEDURES["increlora"] is IncreLora
    assert parse_procedure("increlora:target_rank=4,top_h=2")[1] == {"target_rank": 4, "top_h": 2}
    with pytest.raises(lorakit.ConfigError, match="sync=all of increlora is invalid"):
        parse_procedure("increlora:sync=all")
    assert [default_increment(r) for r in (2, 4, 6, 8)] == [1, 2, 3, 4]  # the authors' table
    with pytest.raises(lorakit.ConfigError, match="use --method lora"):
        procedure().check_model(adapted(method="olora"))
    with pytest.raises(lorakit.ConfigError, match="without --rslora"):
        procedure().check_model(adapted(rslora=True))
    with pytest.raises(lorakit.ConfigError, match=r"capacity per module .* is 5 and must be >= target_rank \+ increment = 6"):
        procedure(target_rank=4).check_model(adapted(rank=5))
    with pytest.raises(lorakit.ConfigError, match="give target_rank=N .* adapted outside `lorakit train`"):
        IncreLora({}).check_model(adapted(rank=5))
    model = adapted()
    with pytest.raises(lorakit.ConfigError, match="use --optimizer adamw"):
        procedure().on_train_begin(TrainingState(model, torch.optim.SGD(model.parameters(), lr=0.1), None, 0, 4, 0))


# ----------------------------------------------------------------------------------------------- importance
def reference_delta_grads(model, ids) -> dict[str, torch.Tensor]:
    """∂L/∂ΔW by autograd: the base weight replaced by W + D with D = ΔW a leaf, the adapters off."""
    layers = dict(lorakit.adapter_layers(model))
    deltas = {name: layer.delta_linear().detach().clone().requires_grad_(True) for name, layer in layers.items()}
    params = {f"{name}.base_layer.weight": layers[name].base_layer.weight + d for name, d in deltas.items()}
    with lorakit.disabled(model):
        loss = torch.func.functional_call(model, params, (ids,), {"labels": ids}).loss
    return dict(zip(deltas, torch.autograd.grad(loss, list(deltas.values())), strict=True))


def randomise_e(proc, seed=3):
    gen = torch.Generator().manual_seed(seed)
    for module in proc.modules:
        with torch.no_grad():
            module.data["E"][: module.active].copy_(torch.randn(module.active, generator=gen))
        module.write_layer()


def test_importance_matches_an_autograd_reference_and_accumulates_micro_batches():
    model = adapted()
    proc = procedure(warmup=100)  # score, never grow
    state = begin(model, proc)
    randomise_e(proc)  # E = 0 at the start would leave only the reserves' tiny part
    first, second = batch(0), batch(1)
    grads = reference_delta_grads(model, torch.cat([first, second]))
    expected = [
        (layer.delta_linear().detach() * grads[name]).abs().sum().item() / layer.delta_linear().numel() ** 0.5
        for name, layer in lorakit.adapter_layers(model)
    ]
    proc.before_step(state)
    for ids in (first, second):  # two micro-batches, each half of the mean loss
        (model(ids, labels=ids).loss / 2).backward()
    proc.after_backward(state)
    torch.testing.assert_close(torch.tensor(proc.last_local_scores), torch.tensor(expected), rtol=1e-5, atol=0)
    assert min(expected) > 0
    # the helper itself: Σ|ΔW ⊙ G| / √numel
    assert importance(torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])).item() == pytest.approx(5 / 2**0.5)


def test_hooks_only_live_between_before_step_and_after_backward():
    model = adapted()
    proc = procedure(warmup=100)
    state = begin(model, proc)
    proc.before_step(state)
    assert proc.hooks
    with torch.no_grad():  # an eval forward inside the step records nothing
        model(batch(0))
    assert all(m.delta_grad is None for m in proc.modules)
    ids = batch(0)
    model(ids, labels=ids).loss.backward()
    proc.after_backward(state)
    assert not proc.hooks and all(not layer._forward_hooks for _, layer in lorakit.adapter_layers(model))


def test_smoothing_follows_the_authors_recurrence():
    ipt = unc = 0.0
    expected_ipt = expected_unc = 0.0
    for s in (1.0, 4.0, 2.0, 0.5):
        ipt, unc = smooth(ipt, unc, s, 0.85, 0.85)
        expected_ipt = 0.85 * expected_ipt + 0.15 * s
        expected_unc = 0.85 * expected_unc + 0.15 * abs(s - expected_ipt)  # with the NEW Ī
        assert (ipt, unc) == pytest.approx((expected_ipt, expected_unc), rel=1e-15)
    # inside the procedure: two steps of scores give Ī, Ū by that recurrence
    model = adapted()
    proc = procedure(warmup=100)
    state = begin(model, proc)
    seen = []
    for step in range(2):
        run_steps(model, proc, state, step + 1)
        seen.append(proc.last_local_scores)
    for i, module in enumerate(proc.modules):
        ipt, unc = smooth(*smooth(0.0, 0.0, seen[0][i], 0.85, 0.85), seen[1][i], 0.85, 0.85)
        assert (module.ipt, module.unc) == pytest.approx((ipt, unc), rel=1e-12)
        assert proc.scores()[module.name] == pytest.approx(ipt * unc, rel=1e-12)


# ----------------------------------------------------------------------------------------------- growth
def test_allocate_picks_the_top_h_and_caps_the_budget_exactly():
    scores = [0.1, 0.9, 0.5, 0.7, 0.3]
    room = [9] * 5
    assert allocate(scores, room, top_h=2, increment=2, remaining=100) == {1: 2, 3: 2}
    # the last growth is capped exactly: 3 ranks left, increment 4 -> the best module gets 3, nobody else
    assert allocate(scores, room, top_h=3, increment=4, remaining=3) == {1: 3}
    assert allocate(scores, room, top_h=3, increment=2, remaining=3) == {1: 2, 3: 1}
    # ties: never more than top_h modules (the authors' threshold would take all tied ones), lower index first
    assert allocate([0.5, 0.5, 0.5, 0.5], [9] * 4, top_h=2, increment=1, remaining=10) == {0: 1, 1: 1}
    # a full module is passed over, a nearly full one gains what fits
    assert allocate(scores, [9, 0, 1, 9, 9], top_h=2, increment=2, remaining=100) == {3: 2, 2: 1}
    assert allocate(scores, room, top_h=3, increment=1, remaining=0) == {}


def set_scores(proc, values):
    for module, value in zip(proc.modules, values, strict=True):
        module.ipt, module.unc = value, 1.0


def test_growth_takes_the_top_modules_rescales_by_ranknum_and_stops_at_the_budget():
    model = adapted(rank=9)  # capacity 9: the initial rank, 4 reserves and room for 4 more
    proc = procedure(target_rank=3, increment=4, top_h=2, advance=False)  # budget 24, 8 to start with
    begin(model, proc)
    randomise_e(proc)
    assert proc.budget == 24 and proc.total == 8 and len(proc.modules) == 8
    before = {m.name: m.layer.delta_linear().detach().clone() for m in proc.modules}
    scores = [0.1, 0.9, 0.2, 0.8, 0.3, 0.0, 0.4, 0.5]
    set_scores(proc, scores)
    proc._grow(5)
    for m in proc.modules:
        m.write_layer()
    grown = {proc.modules[1].name: 4, proc.modules[3].name: 4}
    assert proc.events == [[5, grown]] and proc.total == 16 and not proc.done
    for m in proc.modules:
        rank = 1 + grown.get(m.name, 0)
        assert m.active == rank and m.used == rank + 4
        # existing components rescaled by alpha/ranknum; the new ones start at E = 0 (advance=false)
        torch.testing.assert_close(m.layer.delta_linear(), before[m.name] / rank, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(m.layer.delta_linear(), dense_update(proc, m), rtol=1e-5, atol=1e-8)
    # 8 ranks left; modules 1 and 3 are full (9 = 5 active + 4 reserves): the next two take the rest, exactly
    set_scores(proc, scores)
    proc._grow(6)
    assert proc.events[-1] == [6, {proc.modules[6].name: 4, proc.modules[7].name: 4}]
    assert proc.total == proc.budget == 24 and proc.done
    assert all(m.data["E"][m.active : m.used].abs().sum() == 0 for m in proc.modules)  # reserves switched off
    proc._grow(7)  # nothing left
    assert proc.total == 24 and len(proc.events) == 2


def test_growth_caps_a_large_increment_at_the_budget():
    model = adapted(rank=13)  # room for 1 + 6 reserves + 6 more
    proc = procedure(target_rank=2, increment=6, top_h=4)  # budget 16: 8 ranks to give, 6 at a time
    begin(model, proc)
    set_scores(proc, [0.1, 0.2, 0.9, 0.3, 0.9, 0.0, 0.4, 0.5])  # a tie at the top
    proc._grow(3)
    assert proc.events == [[3, {proc.modules[2].name: 6, proc.modules[4].name: 2}]]
    assert proc.total == proc.budget == 16 and proc.done


@pytest.mark.parametrize("advance", [True, False])
def test_growth_happens_after_warmup_every_interval_in_training(advance):
    model = adapted()
    proc = procedure(target_rank=3, warmup=2, interval=2, top_h=2, advance=advance)  # increment 1, budget 24
    state = begin(model, proc, total=9)
    run_steps(model, proc, state, 9)
    assert [event[0] for event in proc.events] == [4, 6, 8]  # t > warmup and t % interval == 0
    assert all(sum(event[1].values()) == 2 for event in proc.events) and proc.total == 8 + 6
    for m in proc.modules:
        reserves = range(m.active, m.used)
        if advance:  # reserves train ahead, activated components keep the A and B they learnt as reserves
            assert all(m.ab_since[j] != UNTRAINED for j in reserves)
            assert all(m.ab_since[j] < m.e_since[j] for j in range(1, m.active))
        else:  # reserves wait (E = 0, untrained); A, B and E of an activated component join together
            assert all(m.ab_since[j] == UNTRAINED and m.data["E"][j] == 0 for j in reserves)
            assert all(m.ab_since[j] == m.e_since[j] for j in range(1, m.active))


# ----------------------------------------------------------------------------------------------- reserves
def test_reserves_take_part_in_the_forward_and_are_dropped_at_the_end():
    model = adapted()
    proc = procedure(top_h=2)
    state = begin(model, proc, total=3)
    ids = batch(0)
    for m in proc.modules:
        assert m.active == 1 and m.used == 2 and m.data["E"][1].item() == pytest.approx(RESERVE_E)
        torch.testing.assert_close(m.layer.delta_linear(), dense_update(proc, m), rtol=1e-5, atol=1e-12)
    with torch.no_grad():
        logits = model(ids).logits
        module = proc.modules[0]
        module.data["A"][1].mul_(5.0)  # a reserve's A: visible in the output (E = 1e-5, but not zero)
        module.write_layer()
        assert not torch.equal(model(ids).logits, logits)
        module.data["A"][1].div_(5.0)
        module.write_layer()
    run_steps(model, proc, state, 3)  # the last step switches them off
    assert proc.finished and not proc.done
    with torch.no_grad():
        logits = model(ids).logits
        for m in proc.modules:
            assert m.data["E"][m.active : m.used].abs().sum() == 0
            m.data["A"][m.active : m.used].mul_(5.0)
            m.data["Bt"][m.active : m.used].mul_(5.0)
            m.write_layer()
        assert torch.equal(model(ids).logits, logits)
    # the final adapter is the active components only, and computes the live model
    layers = proc.final_layers(model)
    assert {name: layer.r for name, layer in layers.items()} == proc.ranks()
    for m in proc.modules:
        torch.testing.assert_close(layers[m.name].delta_linear(), m.layer.delta_linear(), rtol=1e-5, atol=1e-7)


def test_components_outside_every_group_never_move():
    model = adapted(rank=6)
    proc = procedure(advance=False, warmup=100)
    state = begin(model, proc, total=4, weight_decay=0.1)
    frozen = {
        m.name: (m.data["A"][1:].clone(), m.data["Bt"][1:].clone(), m.data["E"][1:].clone()) for m in proc.modules
    }
    run_steps(model, proc, state, 3)
    for m in proc.modules:
        a, bt, e = frozen[m.name]
        assert torch.equal(m.data["A"][1:], a) and torch.equal(m.data["Bt"][1:], bt) and torch.equal(m.data["E"][1:], e)
        assert m.layer.B[:, 1:].abs().sum() == 0  # not in the forward either
        assert m.data["E"][0] != 0  # the active component trains


# ----------------------------------------------------------------------------------------------- gradients
def test_orthogonality_gradient_is_exact():
    rows = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    value, grad = orthogonality(rows.clone())
    leaf = rows.clone().requires_grad_(True)
    reference = torch.linalg.matrix_norm(leaf @ leaf.T - torch.eye(3, dtype=torch.float64))  # not squared
    (expected,) = torch.autograd.grad(reference, leaf)
    assert value.item() == pytest.approx(reference.item(), rel=1e-14)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("orth", [0.0, 0.1])
def test_true_factor_gradients_match_autograd(orth):
    """A, B, E of every component: the chain rule through the layer's effective B, plus the regulariser, equal the
    autograd gradient of loss + orth · mean_matrices(‖AAᵀ−I‖_F + ‖BᵀB−I‖_F) in the paper's parametrisation."""
    model = adapted()
    proc = procedure(orth=orth)
    state = begin(model, proc)
    randomise_e(proc)
    ids = batch(0)
    leaves = {
        m.name: {k: m.data[k].detach().clone().double().requires_grad_(True) for k in ("A", "Bt", "E")}
        for m in proc.modules
    }
    params, regulariser = {}, 0.0
    for m in proc.modules:
        a, bt, e = (leaves[m.name][k] for k in ("A", "Bt", "E"))
        c = m.layer.config.alpha / m.active
        params[f"{m.name}.base_layer.weight"] = m.layer.base_layer.weight + (c * bt.T @ (e[:, None] * a)).float()
        for rows in (a[: m.used], bt[: m.used]):
            regulariser = regulariser + torch.linalg.matrix_norm(rows @ rows.T - torch.eye(m.used, dtype=rows.dtype))
    with lorakit.disabled(model):
        loss = torch.func.functional_call(model, params, (ids,), {"labels": ids}).loss
    total = loss + orth * regulariser / (2 * len(proc.modules))
    flat = [leaves[m.name][k] for m in proc.modules for k in ("A", "Bt", "E")]
    expected = dict(
        zip([(m.name, k) for m in proc.modules for k in ("A", "Bt", "E")], torch.autograd.grad(total, flat))
    )
    proc.before_step(state)
    model(ids, labels=ids).loss.backward()
    proc._detach_hooks()
    proc._collect_gradients()
    for m in proc.modules:
        assert m.layer.A.grad is None and m.layer.B.grad is None  # the run's optimizer steps nothing
        for k in ("A", "Bt", "E"):
            torch.testing.assert_close(m.grad[k].double(), expected[(m.name, k)], rtol=2e-4, atol=1e-7)


def test_each_growth_is_its_own_adamw_group_with_a_restarted_warmup():
    """Replay: the components of one growth follow a fresh torch AdamW (its own step count from 1) whose rate is
    the run's rate × j / rewarm_steps."""
    model = adapted()
    lr, warm = 1e-2, 3
    proc = procedure(warmup=0, interval=2, top_h=1, rewarm_steps=warm)
    state = begin(model, proc, total=8, lr=lr, weight_decay=0.05)
    run_steps(model, proc, state, 3)  # the growth at step 2
    step, grown = proc.events[0]
    module = next(m for m in proc.modules if m.name in grown)
    assert [g["since"] for g in proc.optimizer.param_groups] == [-1, 2]
    e_row, ab_row = slice(1, 2), slice(2, 3)  # the activated reserve's E, the new reserve's A and B
    watched = {"E": (module.data["E"], e_row), "A": (module.data["A"], ab_row), "Bt": (module.data["Bt"], ab_row)}
    replay = {k: torch.nn.Parameter(t[rows].clone()) for k, (t, rows) in watched.items()}
    reference = torch.optim.AdamW(list(replay.values()), lr=lr, weight_decay=0.05)
    for step in range(3, 8):
        run_steps(model, proc, state, step + 1)
        reference.param_groups[0]["lr"] = lr * min(1.0, (step - 2 - 1) / warm)
        for k, (_, rows) in watched.items():
            replay[k].grad = module.grad[k][rows].clone()
        reference.step()
        for k, (t, rows) in watched.items():
            torch.testing.assert_close(t[rows], replay[k].detach(), rtol=0, atol=1e-7)
    assert proc.optimizer.state[proc.optimizer.param_groups[1]["params"][0]]["step"].item() == 5


# ----------------------------------------------------------------------------------------------- the result
def trained(steps=6, **options):
    model = adapted(rank=6)
    proc = procedure(target_rank=3, top_h=3, **options)
    state = begin(model, proc, total=steps)
    run_steps(model, proc, state, steps)
    return model, proc


def test_rank_flag_is_the_budget_and_the_layers_get_the_capacity():
    """`lorakit train --rank 8 --procedure increlora`: the budget's average rank is 8, each layer holds the capacity
    2·8 + 4 = 20 components; target_rank and capacity override."""
    config = lorakit.AdapterConfig(r=8)
    proc = IncreLora(parse_procedure("increlora")[1])
    assert proc.adapter_config(config).r == 20 and proc.target_rank == 8 and proc.increment == 4
    assert "target_rank=8" in proc.describe() and "capacity=20" in proc.describe()
    proc = IncreLora(parse_procedure("increlora:target_rank=2,capacity=7")[1])
    assert proc.adapter_config(config).r == 7 and proc.target_rank == 2


def test_saved_adapter_reproduces_the_live_model_on_the_original_base(tmp_path):
    model, proc = trained()
    ranks = proc.ranks()
    assert len(set(ranks.values())) > 1 and sum(ranks.values()) <= proc.budget
    ids = batch(99)
    with torch.no_grad():
        live = model(ids).logits
    lorakit.save_adapter(model, tmp_path / "adapter", layers=proc.layers_to_save(model))
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "adapter")  # the ORIGINAL base, strict
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, live, rtol=1e-5, atol=1e-5)
    # the file: one plain LoRA per module at its own rank (alpha = rank: scale 1), no padding
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    tensors = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert meta["method"] == "lora" and meta["format_version"] == 3
    for name, rank in ranks.items():
        info = meta["modules"][name]
        assert (info.get("r", meta["config"]["r"]), info.get("alpha", meta["config"]["alpha"])) == (rank, rank)
        a, b = tensors[f"{name}.A"], tensors[f"{name}.B"]
        assert a.shape[0] == b.shape[1] == rank and int((a.abs().sum(dim=1) > 0).sum()) == rank
    report = proc.report()
    assert report["ranks"] == ranks and report["total_rank"] == sum(ranks.values()) and report["budget"] == 24
    # the reserves trained too: more trained parameters than saved ones
    assert (
        report["trained_parameters"]
        > report["saved_parameters"]
        == sum(r * (m.layer.in_features + m.layer.out_features) for r, m in zip(ranks.values(), proc.modules))
    )


def test_peft_export_with_rank_pattern(tmp_path):
    peft = pytest.importorskip("peft")
    model, proc = trained()
    ids = batch(99)
    with torch.no_grad():
        live = model(ids).logits
    # the saved file holds each module at its own rank (no padding), loads with the strict check, and exports to
    # PEFT with r and a rank_pattern
    ranks = proc.ranks()
    lorakit.save_adapter(model, tmp_path / "adapter", layers=proc.layers_to_save(model))
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert {name: info.get("r", meta["config"]["r"]) for name, info in meta["modules"].items()} == ranks
    stored = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert sum(t.numel() for t in stored.values()) == proc.report()["saved_parameters"]  # not a padded float more
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert {name: layer.r for name, layer in lorakit.adapter_layers(loaded)} == ranks
    lorakit.export_peft(loaded, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and {n: config["rank_pattern"].get(re.escape(n), config["r"]) for n in ranks} == ranks
    exported = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, live, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- resume
def test_resume_mid_growth_continues_exactly(tmp_path):
    from safetensors.torch import save_file

    steps, cut = 8, 3
    whole_model, whole = trained(steps=steps)
    model = adapted(rank=6)
    proc = procedure(target_rank=3, top_h=3)
    state = begin(model, proc, total=steps)
    run_steps(model, proc, state, cut)
    assert proc.events and not proc.done  # in the middle of growth
    # what a checkpoint keeps: the adapter (A, effective B), JSON state, procedure tensors
    lorakit.save_adapter(model, tmp_path / "ckpt")
    saved_state = json.loads(json.dumps(proc.state_dict()))
    save_file({k: v.contiguous() for k, v in proc.state_tensors(model).items()}, str(tmp_path / "proc.safetensors"))
    resumed_model = lorakit.load_adapter(tiny_llama(), tmp_path / "ckpt")
    resumed = procedure(target_rank=3, top_h=3)
    resumed.load_state_dict(saved_state, load_file(str(tmp_path / "proc.safetensors")), resumed_model)
    state = begin(resumed_model, resumed, total=steps, step=cut)
    run_steps(resumed_model, resumed, state, steps)
    assert resumed.events == whole.events and resumed.ranks() == whole.ranks()
    for a, b in zip(resumed.modules, whole.modules, strict=True):
        for k in ("A", "Bt", "E"):
            assert (a.data[k] - b.data[k]).abs().max() <= 1e-6
            assert (a.exp_avg_sq[k] - b.exp_avg_sq[k]).abs().max() <= 1e-9
        assert (a.layer.B - b.layer.B).abs().max() <= 1e-6


# ----------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    import lorakit
    from lorakit.procedures import parse_procedure
    from lorakit.procedures.base import TrainingState
    from lorakit.procedures.increlora import IncreLora

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), sys.argv[1]

    def batch(step, process):  # other tokens on each process
        gen = torch.Generator().manual_seed(100 * step + process)
        return torch.randint(32 * process, 32 * process + 32, (2, 12), generator=gen)

    def run(tag, sync, processes):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
        model = lorakit.adapt(base, lorakit.AdapterConfig(r=6, alpha=12, targets="all-linear"))
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if processes == 2 else model
        optimizer = torch.optim.AdamW(lorakit.inject.trainable_parameters(model), lr=1e-2, weight_decay=0.0)
        proc = IncreLora(parse_procedure(f"increlora:target_rank=3,warmup=0,interval=1,top_h=2,sync={sync}")[1])
        proc.reduce_scores = tag != "local"
        state = TrainingState(model, optimizer, None, 0, 5, 0, rank, processes)
        proc.check_model(model)
        proc.on_train_begin(state)
        for step in range(5):
            state.step = step
            proc.before_step(state)
            # one process: both processes' rows (same token count, so the mean loss is the same)
            ids = batch(step, rank) if processes == 2 else torch.cat([batch(step, 0), batch(step, 1)])
            wrapped(ids, labels=ids).loss.backward()
            proc.after_backward(state)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            proc.after_optimizer_step(state)
        tensors = {f"{n}.{k}": v.detach().clone() for n, l in lorakit.adapter_layers(model)
                   for k, v in l.stored_tensors().items()}
        tensors.update({k: v.contiguous() for k, v in proc.state_tensors(model).items()})
        save_file(tensors, f"{out}/{tag}-{rank}.safetensors")
        with open(f"{out}/{tag}-{rank}.json", "w") as f:
            json.dump({"state": proc.state_dict(), "local_scores": proc.last_local_scores}, f)

    run("scores", "scores", 2)
    run("local", "scores", 2)
    run("gradients", "gradients", 2)
    if rank == 0:
        run("single", "scores", 1)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_two_processes_make_the_same_growth_decisions(tmp_path):
    script = tmp_path / "ddp_increlora.py"
    script.write_text(DDP_SCRIPT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    subprocess.run([*launcher, str(script), str(tmp_path)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def read(tag, rank=0):
        tensors = load_file(str(tmp_path / f"{tag}-{rank}.safetensors"))
        return tensors, json.loads((tmp_path / f"{tag}-{rank}.json").read_text())

    # sync=scores (the default): the processes score their own batches, average the scores, decide alike
    (t0, s0), (t1, s1) = read("scores", 0), read("scores", 1)
    assert s0["local_scores"] != s1["local_scores"]  # each process saw its own batch
    assert s0["state"] == s1["state"] and len(s0["state"]["events"]) == 4  # the same decisions, scores and ranks
    assert all(torch.equal(t0[k], t1[k]) for k in t0)  # identical adapters, bit for bit
    # without the all-reduce the processes would decide differently and drift apart
    (l0, j0), (l1, j1) = read("local", 0), read("local", 1)
    assert j0["state"]["events"] != j1["state"]["events"]
    assert any(not torch.equal(l0[k], l1[k]) for k in l0)
    # sync=gradients: ∂L/∂ΔW itself is averaged, so the run equals one process with both batches
    (g0, r0), (g1, r1) = read("gradients", 0), read("gradients", 1)
    single, reference = read("single")
    assert r0["state"] == r1["state"] and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert r0["state"]["events"] == reference["state"]["events"]
    assert max((g0[k] - single[k]).abs().max().item() for k in single) <= 1e-5
    for name, module in reference["state"]["modules"].items():
        assert r0["state"]["modules"][name]["ipt"] == pytest.approx(module["ipt"], rel=1e-5)


def test_train_rank_flag_is_the_average_rank_of_the_budget(tiny_model_dir, instruction_file, tmp_path):
    from lorakit.models import load_model
    from lorakit.training import TrainConfig, train

    cfg = TrainConfig(
        model=str(tiny_model_dir),
        data=str(instruction_file),
        out=str(tmp_path / "run"),
        procedure="increlora:warmup=0,interval=1,top_h=3,rewarm_steps=1",
        rank=2,
        steps=3,
        batch_size=2,
        lr=1e-2,
        max_length=64,
        quiet=True,
    )
    summary = train(cfg)
    report = summary["procedure_report"]
    assert report["budget"] == 2 * len(report["ranks"]) and report["total_rank"] <= report["budget"]
    assert "target_rank=2" in summary["procedure"] and "capacity=5" in summary["procedure"]  # 2·2 + increment 1
    widths = sum(l.in_features + l.out_features for _, l in lorakit.adapter_layers(lorakit.adapt(load_model(str(tiny_model_dir))[0], cfg.adapter_config())))
    assert report["capacity_parameters"] == 5 * widths
