"""Prompt templates: one request (instruction, retrieved context, optional system prompt) -> the ids the
model reads before its reply, and the reply's ids with the token that ends it.

    alpaca       Stanford Alpaca's prompt, [bos] prompt | reply [eos]. A system prompt is a first
                 paragraph, before Alpaca's own preamble ("{system}\\n\\nBelow is an instruction ...").
    llama2-chat  Meta's Llama 2 chat format (llama's `chat_completion`): [bos] "[INST] <<SYS>>\\n{system}
                 \\n<</SYS>>\\n\\n{user} [/INST]" | " {reply} " [eos].
    llama3-chat  Meta's Llama 3 format (llama-models' chat_format.py): <|begin_of_text|>, a system turn when
                 there is a system prompt, the user turn, the assistant header | reply <|eot_id|>.
    auto         the tokenizer's own jinja `chat_template` (an HF tokenizer.json's tokenizer_config.json),
                 rendered as transformers renders it; alpaca when the tokenizer has none.

The user message is the instruction, then a blank line, then the retrieved context: the record's fields in
Alpaca's order, so a data set means the same under every template, and a context cut to fit loses its end,
right before the end of the turn. Messages are stripped of surrounding whitespace, as both Meta formats do.

Special tokens of a template are added by id and never by encoding a string that contains them, so a
record whose text says "<|eot_id|>" stays text. Between two special tokens the text is encoded as one
piece, as transformers does with a rendered chat template. A jinja template renders to a string: the
record's own text is escaped before rendering (each special token's spelling becomes a private-use
marker) so that splitting the string on the tokenizer's special tokens finds only the template's.

The prompt is exactly what generation feeds the model. The reply is what follows it in the full
conversation when the prompt's ids are a prefix of the conversation's ids, else the reply encoded on its
own; it ends with the template's end token (for a jinja template: the first special token after the reply).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from jora_model.errors import JoraError

NAMES = ("alpaca", "llama2-chat", "llama3-chat", "auto")
_ESC = "\U000f0000"  # a private-use character: the escape of a jinja template's record text


def user_message(instruction: str, context: str) -> str:
    """The user turn of a chat template: the instruction, a blank line, the retrieved context."""
    return f"{instruction}\n\n{context}" if context else instruction


class Template:
    """Turns requests into ids for one tokenizer. `name` is what the shards record (auto resolved:
    "alpaca" or "auto" for a jinja template); `stop_ids` are the ids that end generation."""

    name = "alpaca"
    source: str | None = None  # a jinja template's text

    def __init__(self, tokenizer, system: str | None = None):
        self.tokenizer = tokenizer
        self.system = system or None
        self.end_id = tokenizer.eos_id
        self.stop_ids = tuple(dict.fromkeys(tokenizer.end_ids))

    def prompt_ids(self, instruction: str, context: str) -> np.ndarray:
        """int32 ids of everything before the reply, bos first."""
        from jora_model.data.alpaca import render_prompt

        text = render_prompt(instruction, context)
        if self.system:
            text = f"{self.system}\n\n{text}"
        return _join([[self.tokenizer.bos_id], self.tokenizer.encode_array(text)])

    def reply_ids(self, instruction: str, context: str, output: str) -> np.ndarray:
        """int32 ids of the reply and its end token (what the loss is taken on)."""
        return _join([self.tokenizer.encode_array(output), [self.end_id]])

    def metadata(self) -> dict[str, str]:
        """What the shards record, so generation can prompt as training did (nothing for plain alpaca:
        such shards stay as they were before templates existed)."""
        if self.name == "alpaca" and not self.system:
            return {}
        out = {"jora.template": self.name}
        if self.system:
            out["jora.system"] = self.system
        if self.source is not None:
            out["jora.chat_template"] = self.source
        return out


class _SegmentTemplate(Template):
    """A template written as segments: special token ids and text (text between ids encoded as one piece)."""

    def _ids(self, segments: Sequence[int | str]) -> np.ndarray:
        parts: list = []
        text: list[str] = []
        for segment in list(segments) + [None]:
            if isinstance(segment, str):
                text.append(segment)
                continue
            if text:
                parts.append(self.tokenizer.encode_array("".join(text)))
                text = []
            if segment is not None:
                parts.append([segment])
        return _join(parts)

    def _tail(self, anchor: str, reply: str) -> np.ndarray:
        """Ids of `reply` as they come after `anchor` (the text right before it in the same piece)."""
        head = self.tokenizer.encode_array(anchor)
        both = self.tokenizer.encode_array(anchor + reply)
        if len(both) >= len(head) and np.array_equal(both[:len(head)], head):
            return both[len(head):]
        return self.tokenizer.encode_array(reply)


class Llama2Chat(_SegmentTemplate):
    name = "llama2-chat"

    def _inst(self, instruction: str, context: str) -> str:
        content = user_message(instruction, context)
        if self.system:
            content = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{content}"
        return f"[INST] {content.strip()} [/INST]"

    def prompt_ids(self, instruction: str, context: str) -> np.ndarray:
        return self._ids([self.tokenizer.bos_id, self._inst(instruction, context)])

    def reply_ids(self, instruction: str, context: str, output: str) -> np.ndarray:
        return _join([self._tail("[/INST]", f" {output.strip()} "), [self.end_id]])


class Llama3Chat(_SegmentTemplate):
    name = "llama3-chat"
    SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def __init__(self, tokenizer, system: str | None = None):
        super().__init__(tokenizer, system)
        ids = {token: tokenizer.special_id(token) for token in self.SPECIALS}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise JoraError(f"template llama3-chat needs the tokenizer's {', '.join(missing)} special token(s), "
                            "which it lacks (a Llama 3 tokenizer has them; use --template alpaca or llama2-chat)",
                            getattr(tokenizer, "path", None))
        self._start, self._end, self.end_id = (ids[t] for t in self.SPECIALS)
        self.stop_ids = tuple(dict.fromkeys(tuple(tokenizer.end_ids) + (self.end_id,)))

    def _turn(self, role: str, content: str) -> list:
        return [self._start, role, self._end, "\n\n" + content.strip(), self.end_id]

    def prompt_ids(self, instruction: str, context: str) -> np.ndarray:
        system = self._turn("system", self.system) if self.system else []
        return self._ids([self.tokenizer.bos_id, *system, *self._turn("user", user_message(instruction, context)),
                          self._start, "assistant", self._end, "\n\n"])

    def reply_ids(self, instruction: str, context: str, output: str) -> np.ndarray:
        return _join([self._tail("\n\n", output.strip()), [self.end_id]])


class JinjaTemplate(Template):
    """The tokenizer's own chat template (see the module docstring)."""

    name = "auto"

    def __init__(self, tokenizer, source: str, where: Path, system: str | None = None):
        super().__init__(tokenizer, system)
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self._where = source, where
        self._added = tokenizer.added_tokens()  # spelling -> id: transformers splits rendered text on these
        spellings = sorted(self._added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, spellings)) + ")") if spellings else None
        self._escapes = {token: f"{_ESC}{i};" for i, token in enumerate(spellings)}
        self._unescape = {f"{i};": token for i, token in enumerate(spellings)} | {"e;": _ESC}
        # Compiled as transformers compiles chat templates (trim_blocks, lstrip_blocks, loop controls, tojson).
        # No strftime_now: a template that would print today's date keeps its fixed default, so the same
        # data always gives the same shards.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise
        try:
            self._jinja = env.from_string(source)
        except TemplateError as exc:
            raise JoraError(f"the tokenizer's chat_template is not valid jinja: {exc}", where) from None
        self._tokens = _config_tokens(where) | {"bos_token": tokenizer.piece(tokenizer.bos_id),
                                                "eos_token": tokenizer.piece(tokenizer.eos_id)}
        # The end token is found once, on a probe request, so generation knows it before any record.
        self.end_id = int(self.reply_ids("Say hello.", "", "Hello.")[-1])
        self.stop_ids = tuple(dict.fromkeys(tuple(tokenizer.end_ids) + (self.end_id,)))

    def _escape(self, text: str) -> str:
        text = text.replace(_ESC, f"{_ESC}e;")
        for token, marker in self._escapes.items():
            text = text.replace(token, marker)
        return text

    def _render(self, instruction: str, context: str, output: str | None) -> str:
        from jinja2 import TemplateError

        messages = [{"role": "system", "content": self._escape(self.system)}] if self.system else []
        messages.append({"role": "user", "content": self._escape(user_message(instruction, context))})
        if output is not None:
            messages.append({"role": "assistant", "content": self._escape(output)})
        try:
            return self._jinja.render(messages=messages, tools=None, documents=None,
                                      add_generation_prompt=output is None, **self._tokens)
        except (TemplateError, JoraError, TypeError, ValueError) as exc:
            raise JoraError(f"the tokenizer's chat_template fails to render a request: {exc}", self._where) from None

    def _ids(self, rendered: str) -> np.ndarray:
        pieces = self._split.split(rendered) if self._split else [rendered]
        parts: list = []
        for i, piece in enumerate(pieces):
            if i % 2:
                parts.append([self._added[piece]])
            elif piece:
                text = re.sub(f"{_ESC}(e;|[0-9]+;)", lambda m: self._unescape[m.group(1)], piece)
                parts.append(self.tokenizer.encode_array(text))
        return _join(parts)

    def prompt_ids(self, instruction: str, context: str) -> np.ndarray:
        return self._ids(self._render(instruction, context, None))

    def reply_ids(self, instruction: str, context: str, output: str) -> np.ndarray:
        prompt_text, full_text = self._render(instruction, context, None), self._render(instruction, context, output)
        if not full_text.startswith(prompt_text):
            raise JoraError("the tokenizer's chat_template renders a conversation that does not start with "
                            "its generation prompt; jora cannot tell the reply apart", self._where)
        prompt, full = self._ids(prompt_text), self._ids(full_text)
        if len(full) > len(prompt) and np.array_equal(full[:len(prompt)], prompt):
            tail = full[len(prompt):]
        else:
            tail = self._ids(full_text[len(prompt_text):])
        # The reply's text never holds an added token (escaped), so the first one is the template's end.
        ends = [i for i, token in enumerate(tail.tolist()) if token in self._added.values()]
        if not ends:
            raise JoraError("the tokenizer's chat_template puts no special token after the assistant's reply, "
                            "so generation could never stop", self._where)
        return tail[:ends[0] + 1]


def _config_tokens(config: Path) -> dict[str, str]:
    """The special tokens tokenizer_config.json names (unk_token, pad_token, ...): transformers passes them
    to a chat template."""
    if Path(config).name != "tokenizer_config.json":
        return {}
    try:
        data = json.loads(Path(config).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    out = {}
    for key, value in (data.items() if isinstance(data, dict) else ()):
        value = value.get("content") if isinstance(value, dict) else value
        if key.endswith("_token") and isinstance(value, str):
            out[key] = value
    return out


def _raise(message: str):
    raise JoraError(f"the chat template refuses the request: {message}")


def _join(parts: Sequence) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts]) if parts else np.zeros(0, np.int32)


def chat_template(tokenizer) -> tuple[str, Path] | None:
    """(the jinja chat template, the file holding it) of an HF tokenizer.json whose tokenizer_config.json
    has one (a string, or the entry named "default" of a list of named templates); else None."""
    from jora_model.data.hf_tokenizer import HFTokenizer, config_file

    config = config_file(tokenizer.path) if isinstance(tokenizer, HFTokenizer) else None
    if config is None:
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise JoraError("not a readable tokenizer_config.json", config) from None
    source = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if source is not None and not isinstance(source, str):
        raise JoraError("chat_template in tokenizer_config.json is not a string", config)
    return (source, config) if source else None


def shards_template(directory: str | Path, tokenizer, name: str | None = None,
                    system: str | None = None) -> Template:
    """The template a tokenize output (or one of its split directories) was made with, for `tokenizer`;
    `name` and `system`, when given, override what the shards recorded."""
    from jora_model.data.shards import ShardSet

    directory = Path(directory)
    split = next((directory / s for s in ("train", "val") if (directory / s).is_dir()), directory)
    recorded = ShardSet(split).metadata()
    name = name or recorded.get("jora.template", "alpaca")
    source = recorded.get("jora.chat_template") if name == recorded.get("jora.template") else None
    return load_template(name, tokenizer, system if system is not None else recorded.get("jora.system"), source)


def load_template(name: str, tokenizer, system: str | None = None, source: str | None = None) -> Template:
    """The template `name` for `tokenizer`. auto: the tokenizer's chat template, else alpaca; `source`
    gives the jinja text itself (as shards record it). A chat template the tokenizer cannot spell is refused."""
    if name not in NAMES:
        raise JoraError(f"unknown template {name!r}; known: {', '.join(NAMES)}")
    if name == "llama3-chat":
        return Llama3Chat(tokenizer, system)
    if name == "llama2-chat":
        return Llama2Chat(tokenizer, system)
    if name == "auto" and source:  # recorded in shards: the tokenizer's own file may be gone or edited
        from jora_model.data.hf_tokenizer import HFTokenizer, config_file

        if not isinstance(tokenizer, HFTokenizer):
            raise JoraError("the shards were made with a jinja chat template, which needs an HF tokenizer.json",
                            getattr(tokenizer, "path", None))
        return JinjaTemplate(tokenizer, source, config_file(tokenizer.path) or tokenizer.path, system)
    found = chat_template(tokenizer) if name == "auto" else None
    return JinjaTemplate(tokenizer, *found, system) if found else Template(tokenizer, system)
