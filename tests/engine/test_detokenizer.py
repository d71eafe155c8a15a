"""Incremental detokenisation never emits broken UTF-8 and equals a full decode."""

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import gpt2_tokenizer

TEXTS = ["naïve café — 東京タワー 🚀🚀 done", "plain ascii text, nothing fancy", "emoji 👩‍👩‍👧 family and 中文字符"]


def stream(tok, prompt_ids, ids, stop=()):
    detok = IncrementalDetokenizer(tok, prompt_ids, stop)
    pieces = []
    stop_hit = None
    for i, t in enumerate(ids):
        stop_hit = detok.add_token(t)
        finished = stop_hit is not None or i == len(ids) - 1
        if finished and stop_hit is None:
            detok.flush()
        pieces.append(detok.take_new_text(finished))
        if stop_hit:
            break
    return pieces, stop_hit


def test_pieces_are_valid_and_join_to_full_decode():
    tok = gpt2_tokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert len(ids) > len(text.split())  # multi-byte chars span several tokens
        pieces, _ = stream(tok, tok.encode("Prompt:"), ids)
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == tok.decode(ids) == text


def test_stop_string_is_never_emitted_even_across_tokens():
    tok = gpt2_tokenizer()
    ids = tok.encode("alpha beta gamma delta epsilon")
    pieces, stop = stream(tok, [], ids, stop=("gamma d",))
    assert stop == "gamma d"
    assert "".join(pieces) == "alpha beta "


def test_byte_level_tokenizers_take_the_byte_table_fast_path():
    tok = gpt2_tokenizer()
    table = tok.token_bytes_table(skip_special_tokens=True)
    assert table is not None and table[15496] == b"Hello" and table[50256] == b""
    assert tok.token_bytes_table(skip_special_tokens=False)[50256] == b"<|endoftext|>"
    ids = tok.encode("x <|endoftext|> y") if False else [87, 50256, 331]
    pieces, _ = stream(tok, [], ids)
    assert "".join(pieces) == tok.decode(ids)
