"""lorakit.models: the cache of converted GGUF models."""

import json
import logging
from types import SimpleNamespace

from lorakit import models


class _Saves:
    """Stands in for a model or tokenizer: save_pretrained writes one file."""

    def __init__(self, name):
        self.name, self.config = name, SimpleNamespace()

    def save_pretrained(self, directory):
        (directory / self.name).write_text("{}")


def _write(cached):
    models._write_cache(_Saves("config.json"), _Saves("tokenizer.json"), cached)


def test_the_cache_is_written_whole(tmp_path):
    cached = tmp_path / "models" / "m-0123"
    _write(cached)
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "tokenizer.json"]
    assert [p.name for p in cached.parent.iterdir()] == ["m-0123"]  # no temporary directory left


def test_a_cache_another_process_wrote_first_is_kept_without_a_warning(tmp_path, caplog):
    cached = tmp_path / "models" / "m-0123"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text(json.dumps({"written_by": "the other process"}))
    with caplog.at_level(logging.WARNING):
        _write(cached)
    assert not caplog.records
    assert json.loads((cached / "config.json").read_text()) == {"written_by": "the other process"}
    assert [p.name for p in cached.parent.iterdir()] == ["m-0123"]


def test_a_cache_that_cannot_be_written_warns_and_leaves_nothing(tmp_path, caplog):
    cached = tmp_path / "models" / "m-0123"
    cached.mkdir(parents=True)
    (cached / "junk").write_text("not a model")  # a non-empty directory without config.json: the rename fails
    with caplog.at_level(logging.WARNING):
        _write(cached)
    assert "could not cache the converted model" in caplog.text
    assert [p.name for p in cached.parent.iterdir()] == ["m-0123"]
