"""Tokenizer adapters: round trips, chat templates against hand-written strings, stop/pad ids, dispatch."""

import json

import numpy as np
import pytest

from prime_jax.models.tokenizer import (
    IM_START,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    token_char_ends,
    train_sentencepiece,
)
from tests.fixtures import write_hf_tokenizer

CORPUS = [
    "Compute (17 + 5) * 3 - 4.\n\nPresent the answer in LaTex format: \\boxed{Your answer}",
    "17 + 5 = 22\n22 * 3 = 66\n66 - 4 = 62\n\\boxed{62}",
    "def f(x):\n    return (x + 5) * 3 - 4\n",
    "When tackling complex reasoning tasks, you have access to the following actions.",
] * 20
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
# ChatML, written out by hand.
EXPECTED_PROMPT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
ROUND_TRIP = "Compute  (17 + 5)\t* 3 ünïcode 😀\n\n  def f(x):\n    return x"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer saved as an HF directory with a ChatML chat template."""
    return write_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"), CORPUS)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp") / "tok", vocab_size=400)


def test_hf_round_trip_and_ids(hf_dir):
    tok = HFTokenizer(hf_dir)
    assert isinstance(tok, Tokenizer)
    ids = tok.encode(ROUND_TRIP)
    assert tok.decode(ids) == ROUND_TRIP
    assert tok.encode(IM_START + "user")[0] == 1  # special tokens are single ids: 0 eot, 1 start, 2 end
    assert tok.eos_ids == (2,)
    assert tok.pad_id == 0
    assert tok.vocab_size == 320
    assert tok.encode_batch([ROUND_TRIP, EXPECTED_PROMPT, ""]) == [ids, tok.encode(EXPECTED_PROMPT), []]


def test_hf_generation_config_adds_stop_ids(hf_dir, tmp_path):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(hf_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert HFTokenizer(d).eos_ids == (2, 0)


def test_hf_chat_template(hf_dir):
    tok = HFTokenizer(hf_dir)
    assert tok.apply_chat_template(MESSAGES) == EXPECTED_PROMPT
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == EXPECTED_PROMPT.removesuffix(
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(EXPECTED_PROMPT)
    assert tok.decode(ids) == "system\nBe brief.\nuser\nWhat is 2 + 2?\nassistant\n"
    assert tok.decode(ids, skip_special_tokens=False) == EXPECTED_PROMPT


def test_sentencepiece_round_trip_specials_and_digits(sp_tok):
    assert isinstance(sp_tok, Tokenizer)
    assert sp_tok.decode(sp_tok.encode(ROUND_TRIP)) == ROUND_TRIP  # identity normalisation + byte fallback
    ids = sp_tok.encode(EXPECTED_PROMPT)
    assert sp_tok.encode_batch([EXPECTED_PROMPT, ROUND_TRIP, ""]) == [ids, sp_tok.encode(ROUND_TRIP), []]
    # unk = 0, then the user-defined ChatML symbols in order.
    assert ids.count(1) == 3 and ids.count(2) == 2
    assert sp_tok.eos_ids == (2, 3)
    assert sp_tok.pad_id == 3
    assert sp_tok.vocab_size == 400
    assert [sp_tok.decode([i]) for i in sp_tok.encode("12345")] == list("12345")
    assert sp_tok.decode(ids) == "system\nBe brief.\nuser\nWhat is 2 + 2?\nassistant\n"
    assert sp_tok.decode(ids, skip_special_tokens=False) == EXPECTED_PROMPT


def test_ids_without_a_piece_decode_to_nothing_in_both(hf_dir, sp_tok):
    """A model with more embedding rows than tokenizer pieces may sample an id past the vocabulary: HF tokenizers
    drop it, and so does the sentencepiece adapter (its library raises OUT_OF_RANGE)."""
    for tok in (HFTokenizer(hf_dir), sp_tok):
        ids = tok.encode("Compute 17")
        assert tok.decode(ids[:1] + [tok.vocab_size, tok.vocab_size + 7] + ids[1:]) == "Compute 17"


def test_sentencepiece_chat_template(sp_tok):
    assert sp_tok.apply_chat_template(MESSAGES) == EXPECTED_PROMPT
    assert sp_tok.apply_chat_template(MESSAGES[1:], add_generation_prompt=False) == (
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    )
    with pytest.raises(ValueError, match="content"):
        sp_tok.apply_chat_template([{"role": "user"}])


def test_sentencepiece_training_is_deterministic(tmp_path):
    a = train_sentencepiece(CORPUS, tmp_path / "a" / "tok", vocab_size=400)
    b = train_sentencepiece(CORPUS, tmp_path / "b" / "tok", vocab_size=400)
    assert [a.decode([i], skip_special_tokens=False) for i in range(400)] == [
        b.decode([i], skip_special_tokens=False) for i in range(400)
    ]
    assert a.encode(ROUND_TRIP) == b.encode(ROUND_TRIP)


def test_load_tokenizer_dispatch(hf_dir, tmp_path):
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    train_sentencepiece(CORPUS, tmp_path / "x", vocab_size=400)
    assert isinstance(load_tokenizer(tmp_path / "x.model"), SentencePieceTokenizer)
    # A warm-start model directory: config, weights and a sentencepiece tokenizer.model, no HF tokenizer files.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.model").write_bytes((tmp_path / "x.model").read_bytes())
    from_dir = load_tokenizer(tmp_path / "model")
    assert isinstance(from_dir, SentencePieceTokenizer)
    assert from_dir.encode(ROUND_TRIP) == load_tokenizer(tmp_path / "x.model").encode(ROUND_TRIP)
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="local directory"):
        HFTokenizer(tmp_path / "nope")


def test_sentencepiece_vocab_size_is_an_upper_bound(tmp_path):
    small = train_sentencepiece(["ab ab ab"], tmp_path / "small", vocab_size=1000, byte_fallback=False)
    assert small.vocab_size < 1000
    assert small.decode(small.encode("ab ab")) == "ab ab"


def test_token_char_ends_by_hand():
    # one character per token, 0 a special token that decodes to nothing (as an EOS does)
    def chars(ids):
        return "".join(chr(i) for i in ids if i)

    assert token_char_ends(chars, [ord(c) for c in "ab\nc"] + [0]).tolist() == [1, 2, 3, 4, 4]
    assert token_char_ends(chars, []).tolist() == []

    # bytes: "→" is e2 86 92; the prefixes "a" + e2 and "a" + e2 86 end in U+FFFD, so the byte completing it covers it
    def utf8(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    assert token_char_ends(utf8, list("a→b".encode())).tolist() == [1, 1, 1, 2, 3]

    # a decoder that strips the leading space of a text's first token: " a", " b", " c" -> "a b c"; alone each token
    # would decode to one character, in context " b" and " c" add two: ends 1, 3, 5
    words = {1: " a", 2: " b", 3: " c"}

    def stripping(ids):
        return "".join(words[i] for i in ids).removeprefix(" ")

    assert token_char_ends(stripping, [1, 2, 3]).tolist() == [1, 3, 5]


@pytest.mark.parametrize("kind", ["hf", "sp"])
@pytest.mark.parametrize("text", ["17 + 5 = 22\n22 * 3 = 66\n\\boxed{66}", ROUND_TRIP])
def test_token_char_ends_cover_the_decoded_text_in_order(hf_dir, sp_tok, kind, text):
    """Real tokenizers, on ASCII and on characters split over byte tokens (decoded alone, a byte is U+FFFD): the ends
    rise to the whole text, and each token whose own decode is whole text covers exactly that text."""
    tok = HFTokenizer(hf_dir) if kind == "hf" else sp_tok
    ids = tok.encode(text)
    ends = token_char_ends(tok.decode, ids)
    assert ends[-1] == len(text) and np.all(np.diff(ends) >= 0)
    starts = np.concatenate([[0], ends[:-1]])
    whole = [(i, a, b) for i, a, b in zip(ids, starts, ends) if "\ufffd" not in tok.decode([i])]
    assert all(text[a:b] == tok.decode([i]) for i, a, b in whole)
    assert len(whole) >= len(ids) // 2
