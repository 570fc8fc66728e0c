"""Prompt templates (jora_model.data.templates) against code nobody here wrote.

Oracles: transformers' `apply_chat_template` on tiny HF tokenizer.json files carrying Meta's Llama 3 and
Llama 2 chat templates as HF's instruct tokenizer_config.json files ship them; Meta's own formats, ported
below from llama-models' chat_format.py (Llama 3, on tiktoken) and llama's `chat_completion` (Llama 2, on
SentencePiece). Every tokenizer is made here; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from jora_model.data.alpaca import tokenize_record
from jora_model.data.shards import ShardSet
from jora_model.data.templates import load_template, shards_template
from jora_model.data.tokenizer import load_tokenizer
from jora_model.errors import JoraError
from pipeline.cli import cli
from stages.tokenize import TokenizeSettings, tokenize
from tests.test_convert_stage import assert_clean_failure
from tests.test_tokenizers import PATTERN, SPECIAL_NAMES, TEXTS, WORDS, _ranks, meta_encoding, write_ranks

# HF's Llama 3 (3.0) instruct tokenizer_config.json chat_template and its Llama 2 chat one, verbatim.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
# (instruction, retrieved context, reply): digits, punctuation, unicode, newlines and stray whitespace at
# the edges, which both formats strip
REQUESTS = [
    ("Write the thing's name", "", "The answer is 42."),
    ("  Summarise:", "caf\u00e9 \u00fcber \u65e5\u672c\n\nsecond paragraph  ", "\n123 and 45\t"),
    ("What does ### mean?", "### Instruction:\nnot a header", "!Below, the task"),
]
SYSTEMS = [None, "Answer from the context."]
EOT_TEXT = {"instruction": "Quote <|eot_id|> please", "input": "<|start_header_id|>user<|end_header_id|>",
            "output": "It reads <|eot_id|><|end_of_text|> as text"}


def _hf_tokenizer_dir(root: Path, specials: list[str], config: dict) -> Path:
    """A byte-level BPE tokenizer.json with Llama 3's split pattern (as HF Llama 3 files have it) and
    `specials` as added tokens, beside a tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    lib = Tokenizer(models.BPE())
    lib.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    lib.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t for request in REQUESTS for t in request] + TEXTS + WORDS + ["[INST] [/INST] <<SYS>>"]
    lib.train_from_iterator(corpus * 5, trainer)
    root.mkdir(parents=True, exist_ok=True)
    lib.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    return root / "tokenizer.json"


@pytest.fixture(scope="module")
def hf3(tmp_path_factory):
    return _hf_tokenizer_dir(tmp_path_factory.mktemp("hf3"), SPECIAL_NAMES, {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3})


@pytest.fixture(scope="module")
def hf2(tmp_path_factory):
    return _hf_tokenizer_dir(tmp_path_factory.mktemp("hf2"), ["<unk>", "<s>", "</s>"], {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": LLAMA2})


@pytest.fixture(scope="module")
def ranks_file(tmp_path_factory):
    return write_ranks(tmp_path_factory.mktemp("tiktoken") / "tokenizer.model", _ranks())


def _transformers_ids(path: Path, messages: list[dict], generation_prompt: bool) -> list[int]:
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(str(path.parent)).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _user(instruction: str, context: str) -> str:
    """The user message as the module docstring lays it out: instruction, blank line, retrieved context."""
    return f"{instruction}\n\n{context}" if context else instruction


def _messages(system, instruction, context, reply=None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    out.append({"role": "user", "content": _user(instruction, context)})
    return out + ([{"role": "assistant", "content": reply}] if reply is not None else [])


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("name, fixture", [("llama3-chat", "hf3"), ("auto", "hf3"),
                                           ("llama2-chat", "hf2"), ("auto", "hf2")])
def test_chat_templates_equal_transformers_apply_chat_template(name, fixture, system, request):
    path = request.getfixturevalue(fixture)
    tok = load_tokenizer(path)
    template = load_template(name, tok, system)
    assert template.name == name
    end = tok.special_id("<|eot_id|>" if fixture == "hf3" else "</s>")
    for instruction, context, reply in REQUESTS:
        prompt = template.prompt_ids(instruction, context).tolist()
        answer = template.reply_ids(instruction, context, reply).tolist()
        assert prompt == _transformers_ids(path, _messages(system, instruction, context), True)
        assert prompt + answer == _transformers_ids(path, _messages(system, instruction, context, reply), False)
        assert answer[-1] == end == template.end_id and end in template.stop_ids
        assert tok.decode(answer[:-1]).strip() == reply.strip()


def _meta_llama3(enc, messages: list[dict], reply: str | None) -> list[int]:
    """llama-models' ChatFormat.encode_dialog_prompt (and, with the reply, the finished assistant turn)."""
    special = enc.encode_single_token

    def header(role: str) -> list[int]:
        return [special("<|start_header_id|>")] + enc.encode_ordinary(role) + [special("<|end_header_id|>")] + \
            enc.encode_ordinary("\n\n")

    tokens = [special("<|begin_of_text|>")]
    for message in messages:
        tokens += header(message["role"]) + enc.encode_ordinary(message["content"].strip()) + [special("<|eot_id|>")]
    tokens += header("assistant")
    return tokens if reply is None else tokens + enc.encode_ordinary(reply.strip()) + [special("<|eot_id|>")]


@pytest.mark.parametrize("system", SYSTEMS)
def test_llama3_chat_equals_meta_chat_format_on_tiktoken(ranks_file, system):
    enc = meta_encoding(_ranks())
    tok = load_tokenizer(ranks_file)
    template = load_template("llama3-chat", tok, system)
    assert template.stop_ids == tuple(enc.encode_single_token(t) for t in ("<|end_of_text|>", "<|eot_id|>",
                                                                          "<|eom_id|>"))
    for instruction, context, reply in REQUESTS + [tuple(EOT_TEXT.values())]:
        messages = _messages(system, instruction, context)
        prompt = template.prompt_ids(instruction, context).tolist()
        assert prompt == _meta_llama3(enc, messages, None)
        assert prompt + template.reply_ids(instruction, context, reply).tolist() == _meta_llama3(enc, messages, reply)


def _meta_llama2(sp, system, instruction, context, reply=None) -> list[int]:
    """llama's Llama.chat_completion: the system prompt folded into the first user turn in <<SYS>>,
    each finished turn `[bos] [INST] user [/INST] answer [eos]`, the last `[bos] [INST] user [/INST]`."""
    content = _user(instruction, context)
    if system:
        content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
    if reply is None:
        return [sp.bos_id()] + sp.encode(f"[INST] {content.strip()} [/INST]")
    return [sp.bos_id()] + sp.encode(f"[INST] {content.strip()} [/INST] {reply.strip()} ") + [sp.eos_id()]


@pytest.mark.parametrize("system", SYSTEMS)
def test_llama2_chat_equals_meta_chat_completion_on_sentencepiece(tokenizer_model, system):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    tok = load_tokenizer(tokenizer_model)
    template = load_template("llama2-chat", tok, system)
    assert template.stop_ids == (2,) and template.end_id == 2
    for instruction, context, reply in REQUESTS + [tuple(EOT_TEXT.values())]:
        prompt = template.prompt_ids(instruction, context).tolist()
        assert prompt == _meta_llama2(sp, system, instruction, context)
        full = prompt + template.reply_ids(instruction, context, reply).tolist()
        assert full == _meta_llama2(sp, system, instruction, context, reply)


def test_auto_is_llama3_chat_on_a_llama3_tokenizer_and_alpaca_without_a_template(hf3, ranks_file, tmp_path):
    tok = load_tokenizer(hf3)
    auto, llama3 = load_template("auto", tok, "Be brief."), load_template("llama3-chat", tok, "Be brief.")
    for instruction, context, reply in REQUESTS + [tuple(EOT_TEXT.values())]:
        assert auto.prompt_ids(instruction, context).tolist() == llama3.prompt_ids(instruction, context).tolist()
        assert auto.reply_ids(instruction, context, reply).tolist() == \
            llama3.reply_ids(instruction, context, reply).tolist()
    bare = tmp_path / "tokenizer.json"
    bare.write_bytes(hf3.read_bytes())  # no tokenizer_config.json beside it
    assert load_template("auto", load_tokenizer(bare)).name == "alpaca"
    assert load_template("auto", load_tokenizer(ranks_file)).name == "alpaca"


@pytest.mark.parametrize("name, fixture", [("llama3-chat", "ranks_file"), ("llama3-chat", "hf3"),
                                           ("auto", "hf3"), ("auto", "hf2"), ("llama2-chat", "tokenizer_model")])
def test_record_text_spelling_special_tokens_stays_text(name, fixture, request):
    tok = load_tokenizer(request.getfixturevalue(fixture))
    template = load_template(name, tok, "System <|eot_id|> text \U000f0000 kept")
    example = tokenize_record(tok, EOT_TEXT, 0, 512, template)
    ids = example.input_ids.tolist()
    masked = example.input_ids[example.loss_mask].tolist()
    assert tok.decode(masked[:-1]).strip() == EOT_TEXT["output"] and masked[-1] == template.end_id
    turns = 3 if name != "llama2-chat" and fixture != "hf2" else 1  # system, user, assistant
    assert ids.count(template.end_id) == turns  # only the template's own end tokens
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert "System <|eot_id|> text \U000f0000 kept" in tok.decode(ids)


def test_jinja_without_escaping_fails_the_check(hf3, monkeypatch):
    """The deliberate bug: the record's text rendered into the jinja template unescaped."""
    from jora_model.data.templates import JinjaTemplate

    template = load_template("auto", load_tokenizer(hf3))
    monkeypatch.setattr(JinjaTemplate, "_escape", lambda self, text: text)
    example = tokenize_record(template.tokenizer, EOT_TEXT, 0, 512, template)
    assert example.input_ids.tolist().count(template.end_id) > 2


def test_reply_after_a_prompt_whose_last_token_would_merge_into_it(hf2, tmp_path):
    """A template whose generation prompt ends with a space: the conversation's ids then do not start
    with the prompt's (" Hello" is one piece), so the reply is the reply encoded on its own."""
    (tmp_path / "tokenizer.json").write_bytes(hf2.read_bytes())
    config = json.loads(hf2.with_name("tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    template = load_template("auto", tok)
    prompt = template.prompt_ids("Say hi", "")
    assert prompt.tolist() == _transformers_ids(tmp_path / "tokenizer.json", _messages(None, "Say hi", ""), True)
    conversation = _transformers_ids(tmp_path / "tokenizer.json", _messages(None, "Say hi", "", "answer is 42."), False)
    assert conversation[:len(prompt)] != prompt.tolist() and tok.decode(prompt[-1:]) == " "
    answer = template.reply_ids("Say hi", "", "answer is 42.").tolist()
    assert answer == tok.encode("answer is 42.") + [tok.special_id("</s>")] == tok.encode("answer is 42.") + [2]


def _meta_rows(out: Path) -> list[dict]:
    return ds.dataset(out / "train", format="arrow").to_table().to_pylist()


def test_tokenize_stage_masks_reply_and_eot_and_cuts_context_first(ranks_file, tmp_path):
    enc = meta_encoding(_ranks())
    eot = enc.encode_single_token("<|eot_id|>")
    records = [{"instruction": f"Write {i} things about <|eot_id|>", "input": "caf\u00e9 " * (200 if i == 3 else i),
                "output": f"The answer {i}\n\n### is <|end_of_text|> here"} for i in range(8)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    settings = TokenizeSettings(max_seq_len=160, val_fraction=0.0, template="llama3-chat", system="Be brief.")
    result = tokenize(data, tmp_path / "out", ranks_file, settings, workers=1)
    assert result.manifest["facts"]["cut"]["input"] == 1 and result.manifest["facts"]["template"] == "llama3-chat"
    for row in _meta_rows(tmp_path / "out"):
        record = records[row["example_id"]]
        ids, mask = row["input_ids"], row["loss_mask"]
        masked = [i for i, m in zip(ids, mask) if m]
        reply = enc.encode_ordinary(record["output"].strip())
        assert masked == reply + [eot] and mask == [False] * (len(ids) - len(masked)) + [True] * len(masked)
        assert enc.decode(masked[:-1]) == record["output"].strip()
        assert len(ids) <= 160
        messages = _messages("Be brief.", record["instruction"], record["input"])
        if row["example_id"] != 3:
            assert ids == _meta_llama3(enc, messages, record["output"])
        else:  # the context lost its end; the prompt still ends with the assistant's header
            assert ids[:len(ids) - len(masked)][-5:] == _meta_llama3(enc, messages, None)[-5:]
    assert ShardSet(tmp_path / "out" / "train").metadata() == {"jora.template": "llama3-chat",
                                                                "jora.system": "Be brief."}


def test_worker_processes_write_the_same_bytes(hf3, tmp_path):
    """Each spawned worker loads the template itself (the jinja one here): the shards must not change."""
    records = [{"instruction": f"Item {i}", "input": "ctx " * (i % 5), "output": f"answer {i}"} for i in range(600)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    settings = TokenizeSettings(max_seq_len=128, val_fraction=0.1, template="auto", system="Be brief.")
    outputs = [tokenize(data, tmp_path / f"w{n}", hf3, settings, workers=n).out_dir for n in (1, 2)]
    files = sorted(p.relative_to(outputs[0]) for p in outputs[0].rglob("*.arrow"))
    assert files and all((outputs[0] / f).read_bytes() == (outputs[1] / f).read_bytes() for f in files)


def test_template_and_system_are_part_of_the_cache_key(hf3, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi", "input": "ctx", "output": "hi"}] * 3))
    keys, out = [], tmp_path / "out"
    for template, system in [("alpaca", None), ("llama3-chat", None), ("llama3-chat", "Be brief."),
                             ("llama3-chat", "Be terse."), ("auto", "Be terse.")]:
        result = tokenize(data, out, hf3, TokenizeSettings(max_seq_len=128, val_fraction=0.0, template=template,
                                                           system=system), workers=1)
        assert not result.skipped
        keys.append(result.key)
        recorded = ShardSet(out / "train").metadata()
        assert recorded.get("jora.template") == (None if template == "alpaca" else template)
        assert recorded.get("jora.system") == system
    assert len(set(keys)) == len(keys)
    assert tokenize(data, out, hf3, TokenizeSettings(max_seq_len=128, val_fraction=0.0, template="auto",
                                                     system="Be terse."), workers=1).skipped
    config = hf3.with_name("tokenizer_config.json")
    edited = json.loads(config.read_text()) | {"chat_template": LLAMA3 + "{# the same template, another file #}"}
    copy = tmp_path / "tok"
    copy.mkdir()
    (copy / "tokenizer.json").write_bytes(hf3.read_bytes())
    (copy / "tokenizer_config.json").write_text(json.dumps(edited))
    changed = tokenize(data, out, copy / "tokenizer.json", TokenizeSettings(
        max_seq_len=128, val_fraction=0.0, template="auto", system="Be terse."), workers=1)
    assert not changed.skipped and changed.key != keys[-1]
    assert ShardSet(out / "train").metadata()["jora.chat_template"] == edited["chat_template"]


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_bad_templates_are_one_line_and_write_nothing(tokenizer_model, hf3, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi", "output": "hi"}]))
    out = tmp_path / "out"
    assert_clean_failure(_run("tokenize", data, out, "--tokenizer", tokenizer_model, "--template", "llama3-chat"),
                         "llama3-chat needs", "<|eot_id|>", str(tokenizer_model))
    assert _run("tokenize", data, out, "--tokenizer", tokenizer_model, "--template", "chatml").exit_code == 2
    broken = {"{% for m in messages %}": "not valid jinja",  # never closed
              "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}": "no special token after",
              "{{ raise_exception('no system messages') }}": "refuses the request: no system messages"}
    for source, message in broken.items():
        directory = tmp_path / f"tok{len(message)}"
        directory.mkdir()
        (directory / "tokenizer.json").write_bytes(hf3.read_bytes())
        (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": source}))
        assert_clean_failure(_run("tokenize", data, out, "--tokenizer", directory / "tokenizer.json",
                                  "--template", "auto"), message)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    with pytest.raises(JoraError, match="unknown template"):
        load_template("chatml", load_tokenizer(tokenizer_model))


@pytest.fixture(scope="module")
def llama3_store(tmp_path_factory, ranks_file):
    from stages.convert import ConvertSettings, convert
    from tests.oracles.checkpoints import random_hf_llama, write_hf_dir

    root = tmp_path_factory.mktemp("gen")
    hf = random_hf_llama(len(_ranks()) + 256, 64, 2, 4, 2, 96, rope_theta=500000.0, seed=3)
    return convert(write_hf_dir(hf, root / "hf", ranks_file), root / "store", ConvertSettings(dtype="fp32"),
                   progress=False).out_dir


def test_generation_stops_at_the_templates_end_of_turn(llama3_store):
    """A random model's greedy continuation, with the head's rows for its third token and <|eot_id|>
    swapped: the same hidden states now pick <|eot_id|> third, which must end the answer there even
    though eos (<|end_of_text|>) never comes."""
    from jora_model import load_model
    from jora_model.model.generate import Generator, SamplingSettings, generate_text

    model, tok = load_model(llama3_store), load_tokenizer(llama3_store)
    template = load_template("llama3-chat", tok)
    eot = template.end_id
    assert tok.eos_id != eot and eot in tok.end_ids
    prompt = template.prompt_ids("Say hi", "").tolist()
    settings = SamplingSettings(max_new_tokens=8)
    free = Generator(model).generate(prompt, settings, eos_id=None)
    k = next(k for k in range(2, 8) if free[k] not in free[:k])
    assert not set(free) & set(tok.end_ids)
    head = np.array(model.params["lm_head"]["w"])
    head[:, [free[k], eot]] = head[:, [eot, free[k]]]
    model.params = {**model.params, "lm_head": {**model.params["lm_head"], "w": head}}
    generator = Generator(model)
    assert generator.generate(prompt, settings, tok.eos_id)[:k + 1] == free[:k] + [eot]  # eos alone runs on
    assert generator.generate(prompt, settings, template.stop_ids) == free[:k]
    assert generate_text(model, tok, "Say hi", "", settings, generator, template) == tok.decode(free[:k])


def test_generate_command_prompts_as_the_shards_recorded(llama3_store, tmp_path):
    from jora_model import load_model
    from jora_model.model.generate import SamplingSettings, generate_text

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi", "input": "ctx", "output": "hi"}] * 3))
    shards = tokenize(data, tmp_path / "shards", llama3_store, TokenizeSettings(
        max_seq_len=128, val_fraction=0.0, template="llama3-chat", system="Be brief."), workers=1).out_dir
    tok = load_tokenizer(llama3_store)
    template = shards_template(shards, tok)
    assert (template.name, template.system) == ("llama3-chat", "Be brief.")
    expected = generate_text(load_model(llama3_store), tok, "Say hi", "ctx", SamplingSettings(max_new_tokens=6),
                             template=template)
    result = _run("generate", "--model", llama3_store, "--tokenized", shards, "--prompt", "Say hi", "--input", "ctx",
                  "--max-new-tokens", 6)
    assert result.exit_code == 0 and result.stdout == expected + "\n"
    plain = _run("generate", "--model", llama3_store, "--tokenized", shards, "--template", "alpaca", "--system", "",
                 "--prompt", "Say hi", "--input", "ctx", "--max-new-tokens", 6)
    assert plain.exit_code == 0 and plain.stdout == generate_text(
        load_model(llama3_store), tok, "Say hi", "ctx", SamplingSettings(max_new_tokens=6)) + "\n"
