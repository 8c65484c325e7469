"""Config errors: a ValueError naming the field and the fix, raised before the model is touched."""

from __future__ import annotations

import pytest
import torch
from conftest import METHOD_SETTINGS, fresh_copy, perturb_adapters, tiny_bert, tiny_llama

import lorakit

BAD_CONFIGS = [
    (dict(r=0), "r=0 is invalid"),
    (dict(r=-3), "r=-3 is invalid"),
    (dict(r=2.5), "r=2.5 is invalid"),
    (dict(r=True), "r=True is invalid"),
    (dict(alpha=0), "alpha=0 is invalid"),
    (dict(alpha=-1.0), "alpha=-1.0 is invalid"),
    (dict(method="dora"), "method='dora' is unknown; use one of: lora, loraxs, lorta, melora, mini, mora, olora, prolora"),
    (dict(init="xavier"), "init='xavier' is unknown"),
    (dict(dropout=1.0), "dropout=1.0 is invalid"),
    (dict(method="mini", mini_a=0), "mini_a=0 is invalid"),
    (dict(method="mini", mini_b=-2), "mini_b=-2 is invalid"),
    (dict(method="mini", mini_outer="svd"), "mini_outer='svd' is unknown"),
    (dict(targets=[]), "targets=[] is invalid"),
    (dict(targets="(unclosed"), "not a valid regular expression"),
    (dict(seed=-1), "seed=-1 is invalid"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CONFIGS)
def test_bad_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        lorakit.AdapterConfig(**kwargs)


LAYER_ERRORS = [
    (dict(method="olora", r=40), "r=40 is too large for olora on model.layers.0.self_attn.q_proj"),
    (dict(method="mini", mini_a=64), "mini_a=64 is too large for mini_outer='orthonormal'"),
    (dict(method="mini", mini_b=49, mini_outer="qr"), "mini_b=49 is too large for mini_outer='qr'"),
    (dict(targets=["q_proj", "qkv"]), r"targets \['qkv'\] match no module; some linear modules are: q_proj"),
    (dict(targets="nothing.*"), "match no linear module; some available names: q_proj, k_proj"),
    (
        dict(targets=["self_attn"]),
        "target 'model.layers.0.self_attn' is a LlamaAttention, not a linear layer",
    ),
    (dict(targets=["q_proj"], exclude=["q_proj"]), "match no linear module"),
]


@pytest.mark.parametrize("kwargs,message", LAYER_ERRORS)
def test_layer_errors_leave_model_untouched(kwargs, message):
    base = tiny_llama()
    model = fresh_copy(base)
    with pytest.raises(ValueError, match=message):
        lorakit.adapt(model, lorakit.AdapterConfig(**kwargs))
    assert not list(lorakit.adapter_layers(model))
    for (name, a), (_, b) in zip(model.state_dict().items(), base.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in model.parameters())


def test_adapting_twice_is_refused():
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig())
    with pytest.raises(ValueError, match="already adapted"):
        lorakit.adapt(model, lorakit.AdapterConfig())


def test_mini_normal_allows_outer_ranks_wider_than_the_layer():
    model = lorakit.adapt(tiny_bert(), lorakit.AdapterConfig(method="mini", mini_a=64, mini_outer="normal"))
    assert list(lorakit.adapter_layers(model))


def test_operations_on_unadapted_model_are_refused():
    with pytest.raises(ValueError, match="no lorakit adapters"):
        lorakit.merge(tiny_llama())
    with pytest.raises(ValueError, match="not merged"):
        lorakit.unmerge(lorakit.adapt(tiny_llama(), lorakit.AdapterConfig()))


def test_config_round_trips_through_dict():
    cfg = lorakit.AdapterConfig(method="mini", r=4, targets=["q_proj"], mini_outer="qr")
    assert lorakit.AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config field"):
        lorakit.AdapterConfig.from_dict({"method": "lora", "rank": 4})


def _adapted_tensors(config: lorakit.AdapterConfig) -> dict:
    model = lorakit.adapt(tiny_llama(), config)
    layers = lorakit.adapter_layers(model)
    return {f"{n}.{k}": v for n, layer in layers for k, v in layer.state_dict().items() if "base_layer" not in k}


def _same(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(
        first[k].shape == second[k].shape and torch.equal(first[k], second[k]) for k in first
    )


def _config(method: str, **kwargs) -> lorakit.AdapterConfig:
    fits = dict(mini_a=8, mini_b=8) if method == "mini" else {}  # LoRA-Mini's outer ranks, fitted to the tiny model
    return lorakit.AdapterConfig(method=method, r=4, **METHOD_SETTINGS.get(method, {}) | fits | kwargs)


@pytest.mark.parametrize("method", sorted(lorakit.METHODS))
def test_init_gaussian_warns_exactly_where_the_method_ignores_it(method, recwarn):
    if method == "lorta":
        pytest.skip("lorta refuses init='gaussian' (test_lorta.py)")
    config = _config(method, init="gaussian")
    warned = [w for w in recwarn if "ignores init='gaussian'" in str(w.message)]
    ignored = _same(_adapted_tensors(config), _adapted_tensors(_config(method)))
    assert bool(warned) == ignored == (method in ("olora", "loraxs", "mora")), (method, warned)
    if warned:
        assert len(warned) == 1 and warned[0].filename == __file__  # attributed to the caller
        assert str(warned[0].message).startswith(f"{method} ignores init='gaussian': ")


@pytest.mark.parametrize("method", sorted(lorakit.METHODS))
@pytest.mark.parametrize(
    "field", [dict(mini_a=4), dict(mini_b=16), dict(mini_outer="qr"), dict(mini_a=4, mini_outer="qr")]
)
def test_mini_fields_warn_on_every_method_but_mini(method, field, recwarn):
    config = _config(method, **field)
    warned = [w for w in recwarn if "LoRA-Mini's outer matrices" in str(w.message)]
    if method == "mini":
        assert not warned
        assert not _same(_adapted_tensors(config), _adapted_tensors(_config(method)))  # mini reads them
        return
    named = " and ".join(f"{k}={v!r}" for k, v in field.items())
    assert [str(w.message) for w in warned] == [
        f"{method} ignores {named}: they shape LoRA-Mini's outer matrices (method='mini') only"
    ]
    assert warned[0].filename == __file__
    assert _same(_adapted_tensors(config), _adapted_tensors(_config(method)))  # truly ignored


def test_defaults_and_the_cli_defaults_warn_nothing(recwarn, tmp_path):
    from lorakit.training import TrainConfig

    for method in sorted(lorakit.METHODS):
        _config(method)
        TrainConfig(model="m", data="d", out=str(tmp_path / method), method=method).adapter_config()
    assert not [str(w.message) for w in recwarn if "ignores" in str(w.message)]
    TrainConfig(model="m", data="d", out=str(tmp_path / "x"), method="lora", mini_a=16).adapter_config()
    assert [str(w.message) for w in recwarn] == [
        "lora ignores mini_a=16: they shape LoRA-Mini's outer matrices (method='mini') only"
    ]


# tiny_llama: q/o 32 -> 32, k/v 32 -> 16, gate/up 32 -> 48, down 48 -> 32 (min(in, out): 32 or 16), 14 modules
USEFUL_RANKS = [  # (method, settings, the largest useful r on the widest module, on k_proj)
    ("lora", {}, 32, 16),
    ("mini", dict(mini_a=12, mini_b=10, mini_outer="normal"), 10, 10),  # min(in, out, mini_a, mini_b)
    ("melora", dict(extra={"blocks": 4}), 8, 4),  # per block: min(in, out) / blocks
]


def _rank_warnings(recwarn) -> list[str]:
    return [str(w.message) for w in recwarn if "useful maximum" in str(w.message)]


@pytest.mark.parametrize(("method", "settings", "widest", "narrowest"), USEFUL_RANKS)
def test_a_rank_beyond_the_useful_maximum_warns_and_adds_no_rank(method, settings, widest, narrowest, recwarn):
    def adapted(r):
        model = lorakit.adapt(tiny_llama().double(), lorakit.AdapterConfig(method=method, r=r, **settings))
        perturb_adapters(model)  # float64: the rank of ΔW is measured without float32 rounding noise
        layers = lorakit.adapter_layers(model)
        return {name: torch.linalg.matrix_rank(layer.delta_linear()).item() for name, layer in layers}

    at_limit = adapted(widest)
    assert all("of 14 adapted modules" in m for m in _rank_warnings(recwarn))  # some modules use it all
    recwarn.clear()
    adapted(narrowest)
    assert not _rank_warnings(recwarn)
    adapted(narrowest + 1)
    if narrowest < widest:
        (message,) = _rank_warnings(recwarn)
        assert message.startswith(
            f"r={narrowest + 1} exceeds the useful maximum of {method} on 4 of 14 adapted modules "
            f"(e.g. {narrowest} on model.layers.0.self_attn.k_proj, 32 -> 16: "
        )
        assert "r beyond it adds parameters but no rank" in message and "use r <=" not in message
    recwarn.clear()
    beyond = adapted(widest + 3)
    (message,) = _rank_warnings(recwarn)
    assert message.startswith(
        f"r={widest + 3} exceeds the useful maximum of {method} on every adapted module "
        f"(at most {widest} on model.layers.0.self_attn.q_proj, 32 -> 32: "
    )
    assert message.endswith(f"r beyond it adds parameters but no rank; use r <= {widest}")
    assert recwarn[0].filename == __file__
    assert beyond == at_limit  # the words are true: the extra ranks reach no higher-rank update
    blocks = settings.get("extra", {}).get("blocks", 1)
    assert at_limit["model.layers.0.self_attn.q_proj"] == min(32, widest * blocks)


@pytest.mark.parametrize("method", ["prolora", "mora", "lorta"])
def test_methods_whose_useful_rank_is_not_min_in_out_do_not_warn(method, recwarn):
    lorakit.adapt(tiny_llama(), _config(method) if method == "lorta" else lorakit.AdapterConfig(method=method, r=40))
    assert not _rank_warnings(recwarn)
