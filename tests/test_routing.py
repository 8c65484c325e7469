"""A mixed batch (lorakit.routing): each row with its own adapter, or the base, in one forward."""

import pytest
import torch
from conftest import UNSUPPORTED, VARIANTS, make_config, perturb_adapters, tiny_llama

import lorakit

LLAMA_VARIANTS = [v for v in VARIANTS if (v, "llama") not in UNSUPPORTED]
IDS = torch.randint(0, 64, (5, 7), generator=torch.Generator().manual_seed(3))


def adapted(variants, seeds=None):
    model = tiny_llama()
    for i, variant in enumerate(variants):
        name = None if i == 0 else f"a{i}"
        lorakit.adapt(model, make_config(variant, seed=(seeds or range(10, 30))[i], r=2 + 2 * i), name=name)
        perturb_adapters(model, seed=40 + i, adapter=name or "default")
    return model.eval()


def alone(model, name, ids):
    lorakit.set_active(model, None if name == "base" else name)
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(params=["grouped", "gathered"])
def product(request, monkeypatch):
    """Both formulations of the mixed product: rows grouped by adapter, and each row with its gathered factors."""
    monkeypatch.setattr(lorakit.routing, "use_groups", lambda groups, tokens: request.param == "grouped")
    return request.param


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_each_row_equals_that_row_run_alone(variant, product):
    """Two adapters of one method (ranks 2 and 4) and the base, interleaved: within 1e-5 of each row alone."""
    model = adapted([variant, variant])
    rows = ["default", "a1", "base", "a1", "__base__"]
    with torch.no_grad():
        mixed = model(IDS, adapter_names=rows).logits
    for i, name in enumerate(rows):
        expected = alone(model, "base" if name == "__base__" else name, IDS[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("rows", "size", "in_order"),
    [(["a3", "default", "a4", "a1", "a2"], 1, True), (["a1", "a2", "a1", "a2"], 2, False)],
)
def test_even_groups_need_no_padding(rows, size, in_order):
    """Groups of equal size: one row per adapter in batch order (nothing reordered, `Groups.in_order`, whatever the
    names' order: groups follow the first rows), and two rows each, interleaved (reordered)."""
    model = adapted(["lora"] * 5)
    groups = lorakit.routing.Routing(tuple(rows)).groups(tuple(dict.fromkeys(rows)), "cpu")
    assert (groups.size, groups.padded, groups.in_order) == (size, False, in_order)
    ids = IDS[: len(rows)]
    with torch.no_grad():
        mixed = model(ids, adapter_names=rows).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i : i + 1], alone(model, name, ids[i : i + 1]), rtol=0, atol=1e-5)


def test_groups_pad_short_groups_and_leave_base_rows_out():
    routing = lorakit.routing.Routing(("b", "base", "a", "b", "b"))
    groups = routing.groups(("b", "a"), "cpu")
    assert (groups.count, groups.size, groups.padded, groups.in_order) == (2, 3, True, False)
    assert groups.rows.tolist() == [0, 3, 4, 2]  # b's rows, then a's; row 1 (the base) has no group
    assert groups.places.tolist() == [0, 1, 2, 3]  # a's one row at the start of its group of 3
    assert groups.slots.tolist() == [1, 0, 2, 1, 1]
    assert groups.adapters.tolist() == [0, 0, 0, 1]  # of each of `rows`, for the gathered product


def test_uneven_groups_of_many_tokens_gather_each_rows_factors():
    """Padding that would double the rows multiplied is used only while a group holds few tokens (decode)."""
    uneven = lorakit.routing.Routing(("a",) * 13 + ("b", "c", "d")).groups(("a", "b", "c", "d"), "cpu")
    even = lorakit.routing.Routing(("a", "b") * 8).groups(("a", "b"), "cpu")
    assert uneven.count * uneven.size == 52
    assert lorakit.routing.use_groups(uneven, tokens=1) and not lorakit.routing.use_groups(uneven, tokens=128)
    assert lorakit.routing.use_groups(even, tokens=128)


def test_a_mixed_batch_with_gradients_enabled_keeps_the_graph():
    """Inputs that require grad (an eval model outside no_grad): the update is added out of place, and the rows'
    gradients flow through each row's own adapter."""
    model = adapted(["lora", "lora"])
    rows = ["a1", "base", "default", "a1", "default"]
    embeds = model.get_input_embeddings()(IDS).detach().requires_grad_()
    mixed = model(inputs_embeds=embeds, adapter_names=rows).logits
    mixed.sum().backward()
    for i, name in enumerate(rows):
        lorakit.set_active(model, None if name == "base" else name)
        one = embeds[i : i + 1].detach().requires_grad_()
        logits = model(inputs_embeds=one).logits
        logits.sum().backward()
        torch.testing.assert_close(mixed[i : i + 1].detach(), logits.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(embeds.grad[i : i + 1], one.grad, rtol=0, atol=1e-4)


def test_methods_mixed_in_one_batch(product):
    variants = ["lora", "olora", "mora", "lorta", "mini-orthonormal"]
    model = adapted(variants)
    names = ["default", "a1", "a2", "a3", "a4"]
    with torch.no_grad():
        mixed = model(IDS, adapter_names=names).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i : i + 1], alone(model, name, IDS[i : i + 1]), rtol=0, atol=1e-5)


def test_mixed_batch_equals_peft_adapter_names():
    peft = pytest.importorskip("peft")
    model = adapted(["lora", "lora", "lora"])
    ours = {name: dict(lorakit.adapter_layers(model, name)) for name in ("default", "a1", "a2")}
    first = ours["default"]["model.layers.0.self_attn.q_proj"]
    reference = peft.get_peft_model(
        tiny_llama(),
        peft.LoraConfig(r=first.r, lora_alpha=first.config.alpha, target_modules="all-linear"),
        adapter_name="default",
    )
    for name in ("a1", "a2"):
        layer = next(iter(ours[name].values()))
        reference.add_adapter(
            name, peft.LoraConfig(r=layer.r, lora_alpha=layer.config.alpha, target_modules="all-linear")
        )
    with torch.no_grad():
        for module_name, module in reference.named_modules():
            if hasattr(module, "lora_A") and module_name.endswith(("_proj",)):
                target = module_name.removeprefix("base_model.model.")
                for name, layers in ours.items():
                    module.lora_A[name].weight.copy_(layers[target].A)
                    module.lora_B[name].weight.copy_(layers[target].B)
    reference.eval()
    rows = ["a2", "__base__", "default", "a1", "a2"]
    with torch.no_grad():
        expected = reference(input_ids=IDS, adapter_names=rows).logits
        got = model(IDS, adapter_names=rows).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_generate_routes_every_step():
    model = adapted(["lora", "lora"])
    with torch.no_grad():
        for layer in (layer for name in ("default", "a1") for _, layer in lorakit.adapter_layers(model, name)):
            layer.B.mul_(20)  # large enough updates that the greedy tokens differ between adapters
    ids = IDS[:3]
    rows = ["a1", "base", "default"]
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, adapter_names=rows)
    singles = []
    for i, name in enumerate(rows):
        lorakit.set_active(model, None if name == "base" else name)
        singles.append(model.generate(ids[i : i + 1], attention_mask=mask[:1], max_new_tokens=6, do_sample=False))
    assert all(torch.equal(out[i], single[0]) for i, single in enumerate(singles))
    assert len({tuple(s[0, -6:].tolist()) for s in singles}) > 1  # the adapters really differ


def test_routing_is_cleared_after_each_call_and_stacks_follow_the_weights():
    model = adapted(["lora", "lora"])
    with torch.no_grad():
        model(IDS, adapter_names=["a1"] * 5)
    assert all(host.routing is None for _, host in lorakit.inject.hosts(model))
    layer = dict(lorakit.adapter_layers(model, "a1"))["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        layer.B.mul_(3)  # an in-place change (an optimizer step, a hot swap) invalidates the cached stacks
        mixed = model(IDS, adapter_names=["a1"] * 5).logits
    torch.testing.assert_close(mixed, alone(model, "a1", IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("change", ["replaced", "new storage"])
def test_stacks_follow_a_replaced_tensor(change, product):
    model = adapted(["lora", "lora"])
    with torch.no_grad():
        model(IDS, adapter_names=["a1"] * 5)
        layer = dict(lorakit.adapter_layers(model, "a1"))["model.layers.0.self_attn.q_proj"]
        if change == "replaced":  # a new Parameter object: its version counter starts again
            layer.B = torch.nn.Parameter(layer.B * 5, requires_grad=False)
        else:  # `.data =` leaves the version counter as it was
            layer.B.data = layer.B.data * 5
        mixed = model(IDS, adapter_names=["a1", "base", "a1", "default", "a1"]).logits
    torch.testing.assert_close(mixed[0], alone(model, "a1", IDS)[0], rtol=0, atol=1e-5)


def test_hosts_added_and_removed_later_are_routed(product):
    model = tiny_llama()
    lorakit.adapt(model, make_config("lora", targets=["q_proj"]))
    perturb_adapters(model, seed=1)
    model.eval()
    with torch.no_grad():
        model(IDS, adapter_names=["default"] * 5)  # routing installed with the q_proj hosts only
    lorakit.adapt(model, make_config("lora", targets=["v_proj", "down_proj"], seed=2), name="wide")
    perturb_adapters(model, seed=2, adapter="wide")
    rows = ["wide", "default", "base", "wide", "default"]
    with torch.no_grad():
        mixed = model(IDS, adapter_names=rows).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone(model, name, IDS)[i], rtol=0, atol=1e-5)
    lorakit.delete_adapter(model, "default")  # the q_proj hosts go back to plain layers
    with pytest.raises(lorakit.ConfigError, match="'default', which is not an adapter"):
        model(IDS, adapter_names=["default"] * 5)
    with torch.no_grad():
        mixed = model(IDS, adapter_names=rows[:1] + ["base"] * 4).logits
    torch.testing.assert_close(mixed[0], alone(model, "wide", IDS)[0], rtol=0, atol=1e-5)


def test_mini_adapters_of_one_seed_share_outer_matrices_in_the_stack(product):
    model = adapted(["mini-orthonormal"] * 3, seeds=[7, 7, 7])
    host = next(host for _, host in lorakit.inject.hosts(model))
    with torch.no_grad():
        mixed = model(IDS, adapter_names=["default", "a1", "a2", "base", "a1"]).logits
    stacks = next(iter(host.__dict__["_route_stacks"].values()))
    assert stacks.outer is not None and stacks.a.shape[1] == 8  # inner factors over mini_a = 8, not `in` (N x in x r)
    for i, name in enumerate(["default", "a1", "a2", "base", "a1"]):
        torch.testing.assert_close(mixed[i : i + 1], alone(model, name, IDS[i : i + 1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("names", "match"),
    [(["default", "zzz", "base", "base", "base"], "not an adapter"), (["default"] * 3, "has 3 names"),
     ("default", "not a string")],
)
def test_bad_adapter_names_are_refused(names, match):
    model = adapted(["lora", "lora"])
    with pytest.raises(lorakit.ConfigError, match=match), torch.no_grad():
        model(IDS, adapter_names=names)


def test_mixed_batch_is_for_inference():
    model = adapted(["lora", "lora"]).train()
    with pytest.raises(lorakit.ConfigError, match="model.eval"):
        model(IDS, adapter_names=["default"] * 5)
