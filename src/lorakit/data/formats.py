"""Detect the format of records and turn them into token ids with labels (-100 where no loss is taken)."""

from __future__ import annotations

from ..errors import DataError, ModelLoadError

IGNORE = -100
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def detect_format(records: list[dict], source: str) -> str:
    first = records[0]
    if "messages" in first:
        fmt, required = "chat", ("messages",)
    elif "instruction" in first or "output" in first:
        fmt, required = "instruction", ("instruction", "output")
    elif "text" in first:
        fmt, required = "text", ("text",)
    else:
        raise DataError(
            f"{source}: records have fields {sorted(map(str, first))[:6]}; expected 'text', 'instruction' + 'output', "
            "or 'messages'"
        )
    for number, record in enumerate(records, 1):
        for field in required:
            value = record.get(field)
            if value is None or (field != "messages" and not isinstance(value, str)):
                raise DataError(
                    f"{source}: record {number} lacks a text field {field!r} ({fmt} data needs {', '.join(required)})"
                )
        if fmt == "instruction" and record.get("input") is not None and not isinstance(record["input"], str):
            raise DataError(
                f"{source}: record {number} field 'input' is a {type(record['input']).__name__}, not text; "
                "make it a string (or leave it out)"
            )
        if fmt == "chat":
            _check_messages(record["messages"], source, number)
    return fmt


def _check_messages(messages, source, number) -> None:
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise DataError(f"{source}: record {number} 'messages' must be a list of {{'role', 'content'}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{source}: record {number} has no assistant message to train on")


def instruction_prompt(record: dict) -> str:
    """The user turn of an instruction record (instruction, then the input if any)."""
    extra = record.get("input") or ""
    return record["instruction"] + (f"\n\n{extra}" if extra else "")


def apply_chat_template(tokenizer, messages: list[dict], where: str, **kwargs) -> str:
    """The tokenizer's chat template applied to `messages`; a one-line error if the template is broken or refuses
    the messages (templates may raise, e.g. when roles do not alternate)."""
    try:
        from jinja2 import TemplateError, TemplateSyntaxError
    except ImportError:  # pragma: no cover - transformers needs jinja2 for chat templates
        TemplateError = TemplateSyntaxError = ()
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateSyntaxError as exc:
        raise ModelLoadError(
            f"the tokenizer's chat template is not a valid Jinja template ({exc.message}); fix chat_template in the "
            "model's tokenizer files or use a model with a working template"
        ) from None
    except TemplateError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{where}: the tokenizer's chat template refuses the messages ({message[:200]}); "
            "adapt the messages to what the template accepts, or use instruction/text data"
        ) from None


def render(record: dict, fmt: str, tokenizer, where: str = "data") -> tuple[str, list[tuple[int, int]]]:
    """(full text, character spans that are trained on) for one instruction or chat record."""
    if fmt == "instruction":
        if tokenizer.chat_template:
            messages = [
                {"role": "user", "content": instruction_prompt(record)},
                {"role": "assistant", "content": record["output"]},
            ]
            return _render_chat(messages, tokenizer, where)
        template = PLAIN_PROMPT_WITH_INPUT if record.get("input") else PLAIN_PROMPT
        prompt = template.format(instruction=record["instruction"], input=record.get("input") or "")
        response = record["output"] + (tokenizer.eos_token or "")
        return prompt + response, [(len(prompt), len(prompt) + len(response))]
    return _render_chat(record["messages"], tokenizer, where)


def _render_chat(messages: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    full = apply_chat_template(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = apply_chat_template(tokenizer, messages[:i], where, add_generation_prompt=True) if i else ""
        through = apply_chat_template(tokenizer, messages[: i + 1], where)
        if not (full.startswith(before) and full.startswith(through.rstrip("\n"))):
            raise DataError("the tokenizer's chat template renders turns differently in context; use instruction data")
        spans.append((len(before), len(through.rstrip("\n"))))
    return full, spans


def tokenize_records(records: list[dict], fmt: str, tokenizer, max_length: int, source: str) -> list[dict]:
    if fmt == "text":
        return _pack_text(records, tokenizer, max_length, source)
    if fmt == "chat" and not tokenizer.chat_template:
        raise DataError(
            f"{source} holds chat data ('messages') but the model's tokenizer has no chat template; "
            "use a tokenizer with one (e.g. an -Instruct model) or instruction/text data"
        )
    examples = []
    for number, record in enumerate(records, 1):
        text, spans = render(record, fmt, tokenizer, f"{source}: record {number}")
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [
            token if any(start <= lo < end for start, end in spans) else IGNORE
            for token, (lo, _hi) in zip(ids, encoded["offset_mapping"])
        ]
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"{source}: every prompt is longer than --max-length {max_length}; raise --max-length")
    return examples


def _pack_text(records: list[dict], tokenizer, max_length: int, source: str) -> list[dict]:
    """Concatenate documents (each followed by EOS) and cut into blocks of max_length tokens."""
    stream: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for record in records:
        stream.extend(tokenizer(record["text"], add_special_tokens=False)["input_ids"] + eos)
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    blocks = [b for b in blocks if len(b) > 1]
    if not blocks:
        raise DataError(f"{source}: the text holds fewer than 2 tokens; add text")
    return [{"input_ids": b, "labels": list(b)} for b in blocks]
