"""Incremental detokenisation and stop-string handling for one sequence.

Decoding only a small window of recent tokens keeps each step O(1) in the
output length. Text is released only when it is valid UTF-8 (a byte-level
BPE token can end inside a multi-byte character) and when it cannot be the
start of a stop string.
"""

from __future__ import annotations

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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str | None:
        """Append one generated token. Returns the stop string if the text now contains one."""
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
        if self.read_offset < len(self.token_ids):
            prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
            full_text = self._decode(self.token_ids[self.prefix_offset:])
            if len(full_text) > len(prefix_text):
                self.output_text += full_text[len(prefix_text):]
            self.read_offset = len(self.token_ids)
