"""trainable_tokens: k trained rows of the embedding (and of an untied head) beside the frozen ones (token_rows)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, fresh_copy, tiny_llama

import lorakit
from lorakit.errors import BaseModelMismatchError, ConfigError
from lorakit.token_rows import HeadRows, TokenRows

IDS = [3, 5, 60]
TIED = pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])


def _base(tied: bool):
    return tiny_llama(tie_word_embeddings=tied)


def _adapted(base, **overrides):
    config = lorakit.AdapterConfig(r=2, targets=["q_proj", "v_proj"], trainable_tokens=IDS, **overrides)
    return lorakit.adapt(fresh_copy(base), config)


def _batch():
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, VOCAB, (2, 12), generator=gen)
    inputs[:, ::3] = torch.tensor(IDS).repeat(2, 2)[:, : inputs[:, ::3].shape[1]]  # every id appears
    return inputs


def _train(model, inputs, steps=3):
    optimizer = torch.optim.SGD(lorakit.inject.trainable_parameters(model), lr=1.0)
    for _ in range(steps):
        model(inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _changed_rows(new, old):
    return (new != old).any(dim=1).nonzero().flatten().tolist()


@TIED
def test_output_is_unchanged_at_the_start(tied):
    base, inputs = _base(tied), _batch()
    model = _adapted(base)
    with lorakit.disabled(model):
        expected = model(inputs).logits
    torch.testing.assert_close(model(inputs).logits, expected, atol=1e-6, rtol=0)


@TIED
def test_only_those_rows_train(tied):
    base, inputs = _base(tied), _batch()
    model = _adapted(base)
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, TokenRows) and isinstance(head, HeadRows)
    assert embed.rows.shape == (len(IDS), 32)
    model(inputs, labels=inputs).loss.backward()
    assert embed.base.weight.grad is None and head.base.weight.grad is None  # gradients reach the rows only
    assert embed.rows.grad is not None and embed.rows.grad.abs().sum() > 0
    if tied:  # one set of rows, the embedding's, used by both
        assert head.current_rows is embed.rows and head.trainable_parameters() == {}
    else:
        assert head.rows.grad.abs().sum() > 0
    model.zero_grad()
    _train(model, inputs)
    adapted = model(inputs).logits
    merged = lorakit.merge_and_unload(fresh_copy(model))
    torch.testing.assert_close(merged(inputs).logits, adapted, atol=1e-5, rtol=0)
    assert _changed_rows(merged.model.embed_tokens.weight, base.model.embed_tokens.weight) == IDS
    assert _changed_rows(merged.lm_head.weight, base.lm_head.weight) == IDS
    if tied:  # still one tensor, with the new rows, for the embedding and the head
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
    else:
        assert not torch.equal(merged.lm_head.weight[IDS], merged.model.embed_tokens.weight[IDS])


@TIED
def test_disabled_and_unload_restore_the_original(tied):
    base, inputs = _base(tied), _batch()
    expected = base(inputs).logits
    model = _adapted(base)
    _train(model, inputs)
    assert not torch.allclose(model(inputs).logits, expected)
    with lorakit.disabled(model):
        assert torch.equal(model(inputs).logits, expected)
    plain = lorakit.unload(model)
    assert type(plain.model.embed_tokens) is torch.nn.Embedding and type(plain.lm_head) is torch.nn.Linear
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in base.state_dict().items())


@TIED
def test_save_load_is_exact_and_compact(tied, tmp_path):
    base, inputs = _base(tied), _batch()
    model = _adapted(base)
    _train(model, inputs)
    lorakit.save_adapter(model, tmp_path / "rows")
    plain = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(r=2, targets=["q_proj", "v_proj"]))
    lorakit.save_adapter(plain, tmp_path / "plain")
    extra = (tmp_path / "rows" / "adapter.safetensors").stat().st_size
    extra -= (tmp_path / "plain" / "adapter.safetensors").stat().st_size
    row_bytes = len(IDS) * 32 * 4 * (1 if tied else 2)  # k x d float32, once per set of rows
    assert row_bytes <= extra <= row_bytes + 200  # plus the safetensors header entries
    meta = json.loads((tmp_path / "rows" / "adapter.json").read_text())
    assert meta["trainable_tokens"]["ids"] == IDS and meta["trainable_tokens"]["tied"] == tied
    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "rows")
    assert torch.equal(loaded(inputs).logits, model(inputs).logits)
    assert (loaded.lm_head.current_rows is loaded.model.embed_tokens.rows) == tied


@TIED
def test_new_tokens_of_a_resized_embedding_load_onto_another_resize(tied, tmp_path):
    base = _base(tied)
    model = fresh_copy(base)
    model.resize_token_embeddings(VOCAB + 2)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied  # resizing keeps the tie
    ids = [VOCAB, VOCAB + 1]
    model = lorakit.adapt(model, lorakit.AdapterConfig(r=2, targets=["q_proj"], trainable_tokens=ids))
    inputs = torch.tensor([[1, VOCAB, 2, VOCAB + 1, 7]])
    _train(model, inputs)
    lorakit.save_adapter(model, tmp_path / "adapter")
    again = fresh_copy(base)
    torch.manual_seed(123)  # the new rows are drawn anew: they do not matter, the trained rows replace them
    again.resize_token_embeddings(VOCAB + 2)
    assert not torch.equal(again.model.embed_tokens.weight[ids], model.model.embed_tokens.base.weight[ids])
    loaded = lorakit.load_adapter(again, tmp_path / "adapter")
    torch.testing.assert_close(loaded(inputs).logits, model(inputs).logits, atol=1e-6, rtol=0)
    assert (loaded.lm_head.current_rows is loaded.model.embed_tokens.rows) == tied
    wrong_size = r"model.embed_tokens is \(64, 32\) .*\(66, 32\).*resize_token_embeddings"
    with pytest.raises(BaseModelMismatchError, match=wrong_size):
        lorakit.load_adapter(fresh_copy(base), tmp_path / "adapter")


@TIED
def test_a_different_base_is_refused_or_warned(tied, tmp_path):
    base, inputs = _base(tied), _batch()
    model = _adapted(base)
    _train(model, inputs)
    lorakit.save_adapter(model, tmp_path / "adapter")
    other = fresh_copy(base)
    with torch.no_grad():  # a row that does not train
        other.model.embed_tokens.weight[10].add_(1.0)
    with pytest.raises(BaseModelMismatchError, match="model.embed_tokens has different weights"):
        lorakit.load_adapter(fresh_copy(other), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="model.embed_tokens has different weights .* applying it anyway"):
        lorakit.load_adapter(fresh_copy(other), tmp_path / "adapter", strict=False)
    with pytest.raises(BaseModelMismatchError, match="tied"):
        lorakit.load_adapter(_base(not tied), tmp_path / "adapter", strict=False)


def test_bad_trainable_tokens_are_refused():
    with pytest.raises(ConfigError, match=r"trainable_tokens id 64 is outside the input embedding's 64 rows"):
        lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=2, trainable_tokens=[1, 64]))
    with pytest.raises(ConfigError, match="trainable_tokens and modules_to_save both take model.embed_tokens"):
        lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=2, trainable_tokens=[1], modules_to_save=["embed_tokens"]))
    with pytest.raises(ConfigError, match="trainable_tokens and targets both take lm_head"):
        lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=2, targets=["q_proj", "lm_head"], trainable_tokens=[1]))
    for bad in ([], [1, 1], [-1], ["a"], 3):
        with pytest.raises(ConfigError, match="trainable_tokens=.* is invalid"):
            lorakit.AdapterConfig(trainable_tokens=bad)


def test_trainer_checkpoints_keep_the_rows(tmp_path):
    from lorakit.integrations import load_adapter_into

    base, inputs = _base(False), _batch()
    model = _adapted(base)
    _train(model, inputs)
    lorakit.save_adapter(model, tmp_path / "adapter")
    resumed = load_adapter_into(_adapted(base), tmp_path / "adapter")
    assert torch.equal(resumed(inputs).logits, model(inputs).logits)


def test_scaled_embeddings_keep_their_scale():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    base = Gemma3ForCausalLM(config).eval()
    assert hasattr(base.get_input_embeddings(), "embed_scale")  # Gemma 3 multiplies inside the embedding
    inputs = _batch()
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(r=2, targets=["q_proj"], trainable_tokens=IDS))
    torch.testing.assert_close(model(inputs).logits, base(inputs).logits, atol=1e-6, rtol=0)


@TIED
def test_summary_lists_the_token_rows_and_saved_modules(tied):
    model = _adapted(_base(tied), modules_to_save=["norm"])
    report = lorakit.summary(model)
    rows = {row[0]: row[4] for row in report.rows}
    hidden = model.config.hidden_size
    assert rows["model.embed_tokens (3 token rows)"] == len(IDS) * hidden
    assert rows["lm_head (3 token rows)"] == (0 if tied else len(IDS) * hidden)  # tied: the embedding's rows
    assert rows["model.norm (trained in full)"] == hidden
    assert sum(rows.values()) == report.trainable  # every trained parameter is in one row, once
    text = str(report)
    assert "model.norm (trained in full)" in text and "in 4 modules" in text  # q and v of two layers
