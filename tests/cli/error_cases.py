"""The bad inputs of docs/errors.md: the files they need, and how to run one row.

`python tests/cli/error_cases.py` runs every row and prints the table for docs/errors.md (placeholders kept).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parents[1] / "docs" / "errors.md"
sys.path.insert(0, str(HERE.parent))


def build_files(root: Path) -> dict[str, str]:
    """Create every file a row refers to; returns the placeholder -> path mapping (without {out})."""
    import torch
    from tiny_assets import build_model_dir, write_instruction_data
    from transformers import AutoModelForCausalLM

    import lorakit

    files = {"tmp": root}
    files["model"] = build_model_dir(root / "model")
    files["othermodel"] = build_model_dir(root / "othermodel", seed=1)
    files["data"] = write_instruction_data(root / "train.jsonl")
    (root / "notmodel").mkdir()
    (root / "notmodel" / "readme.txt").write_text("not a model")
    files["notmodel"] = root / "notmodel"
    files["badgguf"] = root / "bad.gguf"
    files["badgguf"].write_bytes(b"GGUF" + bytes(range(256)))
    texts = {
        "empty": "",
        "broken": '{"text": "a"}\n{"text": \n',
        "nooutput": '{"instruction": "a"}\n',
        "notext": '{"text": "a"}\n{"body": "b"}\n',
    }
    for name, content in texts.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text(content)
    files["prompts"] = root / "prompts.jsonl"  # a mixed-batch prompt naming an adapter that is not served
    files["prompts"].write_text('{"adapter": "nope", "prompt": "hi"}\n')
    files["outfile"] = root / "outfile"
    files["outfile"].write_text("an existing file\n")
    model = lorakit.adapt(AutoModelForCausalLM.from_pretrained(files["model"]), lorakit.AdapterConfig(r=4))
    files["adapter"] = lorakit.save_adapter(model, root / "adapter")
    for name in ("corrupt", "truncated", "nofields", "newer"):
        files[name] = Path(shutil.copytree(files["adapter"], root / name))
    tensors = files["corrupt"] / "adapter.safetensors"
    tensors.write_bytes(bytes(b ^ 0xFF for b in tensors.read_bytes()))
    os.truncate(files["truncated"] / "adapter.safetensors", 1000)
    for name, edit in (("nofields", lambda d: d.pop("modules")), ("newer", lambda d: d.update(format_version=5))):
        meta = json.loads((files[name] / "adapter.json").read_text())
        edit(meta)
        (files[name] / "adapter.json").write_text(json.dumps(meta))
    # an adapter trained with --task classification (its head saved in full, its labels beside it)
    from lorakit.models import load_model
    from lorakit.training.classification import save_labels

    classifier, _ = load_model(str(files["model"]), num_labels=2)
    classifier = lorakit.adapt(classifier, lorakit.AdapterConfig(r=2, targets=["q_proj"], modules_to_save=["score"]))
    files["classifier"] = lorakit.save_adapter(classifier, root / "classifier")
    save_labels(files["classifier"], ["neg", "pos"])
    files["merged"] = Path(shutil.copytree(files["model"], root / "merged"))
    (files["merged"] / "lorakit_merged.json").write_text("{}")
    # chat data, and models whose tokenizer has no chat template, one that refuses the messages, a broken one
    files["chat"] = root / "chat.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    files["chat"].write_text(json.dumps(chat) + "\n")
    files["notemplate"] = build_model_dir(root / "notemplate", chat_template=False)
    files["oddmodel"] = build_model_dir(root / "oddmodel", intermediate_size=49)  # 32 x 49 weights: not 64-blocks
    templates = {
        "refusing": '{{ raise_exception("roles must alternate user/assistant/user") }}',
        "badtemplate": "{% for m in messages %",
    }
    for name, template in templates.items():
        files[name] = Path(shutil.copytree(files["model"], root / name))
        (files[name] / "chat_template.jinja").write_text(template)
    # data files with the wrong types or encodings
    files["binary"] = root / "binary.jsonl"
    files["binary"].write_bytes(b"\xff\xfe\x00 not text\n")
    files["extracsv"] = root / "extra.csv"
    files["extracsv"].write_text("instruction,output\na,b,c\n")
    files["listinput"] = root / "listinput.jsonl"
    files["listinput"].write_text(json.dumps({"instruction": "a", "input": ["x"], "output": "b"}) + "\n")
    # model directories with a truncated weights file, and with weights that do not fit config.json
    files["badweights"] = Path(shutil.copytree(files["model"], root / "badweights"))
    os.truncate(files["badweights"] / "model.safetensors", 100)
    files["mismatched"] = Path(shutil.copytree(files["model"], root / "mismatched"))
    config = json.loads((files["mismatched"] / "config.json").read_text())
    config["intermediate_size"] += 16
    (files["mismatched"] / "config.json").write_text(json.dumps(config))
    # a tiny Mixtral: its experts are 3-D parameters (transformers 5), not linear layers
    from tiny_assets import build_architecture_dir

    files["moe"] = build_architecture_dir(root / "moe", "mixtral")
    del torch
    return {k: str(v) for k, v in files.items()}


def parse_doc() -> list[dict]:
    rows = []
    for line in DOC.read_text().splitlines():
        match = re.fullmatch(r"\| (\d+) \| (.+?) \| `lorakit (.+?)` \| `(.+)` \|", line.strip())
        if match:
            rows.append({"number": int(match[1]), "input": match[2], "command": match[3], "message": match[4]})
    return rows


def run_row(command: str, files: dict[str, str], out: str) -> subprocess.CompletedProcess:
    args = [part.format(**files, out=out) for part in shlex.split(command)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, env=env)


def _unformat(text: str, files: dict[str, str], out: str) -> str:
    for key, value in sorted({**files, "out": out}.items(), key=lambda kv: -len(kv[1])):
        text = text.replace(value, "{" + key + "}")
    return text


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        files = build_files(Path(tmp))
        for number, line in enumerate(Path(sys.argv[1]).read_text().splitlines(), 1):
            label, command = line.split("|", 1)
            out = str(Path(tmp) / f"out-{number}")
            result = run_row(command, files, out)
            last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "(nothing)"
            print(
                f"| {number} | {label} | `lorakit {command}` | `{_unformat(last, files, out)}` |  rc={result.returncode}"
            )
