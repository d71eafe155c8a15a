"""Incremental detokenisation and stop-string handling for one sequence.

Decoding only a small window of recent tokens keeps each step O(1) in the
output length. Text is released only when it is valid UTF-8 (a byte-level
BPE token can end inside a multi-byte character) and when it cannot be the
start of a stop string.
"""

from __future__ import annotations

import codecs

from engine.tokenizer import TokenizerWrapper

# Tokens decoded before the new ones, so tokenizers that strip a leading
# space or merge bytes across tokens see enough context.
_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: TokenizerWrapper,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.output_text = ""
        self.num_emitted_chars = 0
        # Byte-level vocabularies: decode token bytes incrementally (errors="replace" like decode()).
        self._bytes = tokenizer.token_bytes_table(skip_special_tokens)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if self._bytes is not None else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str | None:
        """Append one generated token. Returns the stop string if the text now contains one."""
        if self._utf8 is not None:
            table = self._bytes
            new_text = self._utf8.decode(table[token_id] if 0 <= token_id < len(table) else b"")
            if not new_text:
                return None
            search_from = max(0, len(self.output_text) - self.holdback)
            self.output_text += new_text
            return self._check_stop(search_from) if self.stop else None
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        # A UTF-8 character spans at most 4 byte tokens: past that, the bytes are
        # simply invalid and waiting longer would only grow the window.
        if full_text.endswith(_REPLACEMENT) and len(self.token_ids) - self.read_offset < 4:
            return None
        new_text = full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
        self.prefix_offset = max(self.read_offset, len(self.token_ids) - _CONTEXT_TOKENS)
        self.read_offset = len(self.token_ids)
        if not new_text:
            return None
        search_from = max(0, len(self.output_text) - self.holdback)
        self.output_text += new_text
        return self._check_stop(search_from)

    def add_tokens(self, token_ids: list[int]) -> None:
        """Append several tokens when no stop strings are set (one decode call, not one per token)."""
        assert not self.stop
        if self._utf8 is not None:
            table = self._bytes
            n = len(table)
            self.output_text += self._utf8.decode(b"".join(table[t] if 0 <= t < n else b"" for t in token_ids))
        else:
            for t in token_ids:
                self.add_token(t)

    def _check_stop(self, search_from: int) -> str | None:
        for stop in self.stop:
            idx = self.output_text.find(stop, search_from)
            if idx != -1:
                end = idx + len(stop) if self.include_stop_str_in_output else idx
                self.output_text = self.output_text[:end]
                return stop
        return None

    def take_new_text(self, finished: bool) -> str:
        """Text not yet handed out; while running, keep back what could start a stop string."""
        limit = len(self.output_text) if finished or not self.stop else len(self.output_text) - self.holdback
        if limit <= self.num_emitted_chars:
            return ""
        text = self.output_text[self.num_emitted_chars:limit]
        self.num_emitted_chars = limit
        return text

    def flush(self) -> None:
        """At finish: decode whatever is still pending (e.g. a trailing partial character)."""
        if self._utf8 is not None:
            self.output_text += self._utf8.decode(b"", final=True)
            return
        if self.read_offset < len(self.token_ids):
            prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
            full_text = self._decode(self.token_ids[self.prefix_offset:])
            if len(full_text) > len(prefix_text):
                self.output_text += full_text[len(prefix_text):]
            self.read_offset = len(self.token_ids)
