"""Tokenizers behind one small protocol: HF `tokenizer.json` directories and sentencepiece models.

The trainer needs only: text -> ids, ids -> text, the chat template, the stop ids and the pad id
(and, for step diagnostics, where each token's text lies in a decoded response: `token_char_ends`).
`HFTokenizer` wraps a local HF tokenizer directory (Qwen2.5, Llama 3, ...); `SentencePieceTokenizer`
wraps a `.model` file with a ChatML template and is what the built-in tiny CPU run trains for
itself with `train_sentencepiece` (no downloads).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

import jinja2
import jinja2.sandbox
import numpy as np
import sentencepiece as spm

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
CHATML_SPECIAL_TOKENS = (IM_START, IM_END, ENDOFTEXT)

# ChatML, as Qwen uses it (without Qwen's default system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer, sampler and datasets need from a tokenizer."""

    eos_ids: tuple[int, ...]  # every id that ends a response (first one counts)
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS added (special-token strings map to their ids)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`, computed in parallel where the backend can."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens dropped when `skip_special_tokens`."""
        ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for chat `messages` ([{role, content}, ...])."""
        ...


def _compile_chat_template(template: str) -> jinja2.Template:
    """Compile a Jinja chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def _check_messages(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
            m.get("content"), str
        ):
            raise ValueError(f"chat message {i} must be a dict with str 'role' and 'content', got {m!r}")


class HFTokenizer:
    """Thin adapter over `transformers.AutoTokenizer` for a local tokenizer directory.

    `eos_ids` is the tokenizer's EOS plus every `eos_token_id` of `generation_config.json` when the
    directory has one (Qwen2.5-Instruct stops on both `<|im_end|>` and `<|endoftext|>`).
    """

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer  # heavy import, only when an HF tokenizer is used

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"HF tokenizer path must be a local directory, got {path!r}")
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eos: list[int] = []
        if self._tok.eos_token_id is not None:
            eos.append(int(self._tok.eos_token_id))
        gen_cfg = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_cfg):
            with open(gen_cfg) as f:
                extra = json.load(f).get("eos_token_id")
            extra_ids = extra if isinstance(extra, list) else [] if extra is None else [extra]
            for i in extra_ids:
                if int(i) not in eos:
                    eos.append(int(i))
        if not eos:
            raise ValueError(f"tokenizer in {path!r} defines no EOS token")
        self.eos_ids: tuple[int, ...] = tuple(eos)
        pad = self._tok.pad_token_id
        self.pad_id: int = int(pad) if pad is not None else self.eos_ids[0]
        self.vocab_size: int = len(self._tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without added BOS/EOS."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts (the Rust tokenizer's parallel batch path)."""
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Prompt text from the directory's own chat template."""
        _check_messages(messages)
        if not self._tok.chat_template:
            raise ValueError("this HF tokenizer has no chat_template")
        return self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


class SentencePieceTokenizer:
    """A sentencepiece `.model` with a Jinja chat template (ChatML by default).

    The ChatML markers are user-defined symbols of the model, so they encode to single ids wherever
    they appear in text. `eos_ids` = ids of `<|im_end|>` and `<|endoftext|>` (those present);
    `pad_id` = the model's pad id if it has one, else `<|endoftext|>`.
    """

    def __init__(self, model_file: str | os.PathLike, chat_template: str = CHATML_TEMPLATE):
        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise ValueError(f"sentencepiece model file not found: {model_file!r}")
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self.chat_template = chat_template
        self._compiled_template = _compile_chat_template(chat_template)
        self.vocab_size: int = self._sp.get_piece_size()
        specials = {t: self._sp.piece_to_id(t) for t in CHATML_SPECIAL_TOKENS}
        specials = {t: i for t, i in specials.items() if self._sp.id_to_piece(i) == t}
        self.eos_ids: tuple[int, ...] = tuple(specials[t] for t in (IM_END, ENDOFTEXT) if t in specials)
        if not self.eos_ids:
            raise ValueError(f"{model_file!r} has neither {IM_END} nor {ENDOFTEXT} as a piece")
        if self._sp.pad_id() >= 0:
            self.pad_id: int = self._sp.pad_id()
        elif ENDOFTEXT in specials:
            self.pad_id = specials[ENDOFTEXT]
        else:
            raise ValueError(f"{model_file!r} has no pad piece and no {ENDOFTEXT}")
        self._special_ids = frozenset(specials.values()) | frozenset(
            i for i in range(self.vocab_size) if self._sp.is_control(i)
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS; ChatML markers map to their single ids)."""
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts (sentencepiece's multi-threaded batch encode)."""
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ChatML markers and control pieces dropped when `skip_special_tokens`. Ids without a piece
        decode to nothing, as in HF tokenizers: a model's embedding may have more rows than its tokenizer has pieces
        (Qwen2.5: 151,936 for 151,665), and a sampled id from the rest must not stop the run."""
        ids = [i for i in map(int, ids) if 0 <= i < self.vocab_size]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._sp.decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Prompt text rendered from `chat_template`."""
        _check_messages(messages)
        return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt)


def token_char_ends(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> np.ndarray:
    """Where each token's text ends in `decode(ids)`: [T] int64, token t covers characters [ends[t-1], ends[t]).

    Incremental detokenisation, as streaming servers do it: the text token t adds is decode(ids[p:t+1]) minus
    decode(ids[p:r]), with r the first token not yet shown and p the start of the last shown token's window, kept
    as context so that a decoder treating a text's first token specially (a stripped leading space) treats both
    alike. A decode ending in U+FFFD (an unfinished character: its bytes split over tokens) shows nothing yet, so
    the token completing a character covers it. Two decodes of a few tokens each per token: linear in T.
    """
    ends, shown, p, r = np.zeros(len(ids), np.int64), 0, 0, 0
    for t in range(len(ids)):
        before, after = decode(ids[p:r]), decode(ids[p:t + 1])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            shown += len(after) - len(before)
            p, r = r, t + 1
        ends[t] = shown
    return ends


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A directory with HF tokenizer files -> `HFTokenizer`; a `.model` file, or a directory whose only tokenizer
    file is `tokenizer.model` (what `prime_jax.warm_start` writes) -> `SentencePieceTokenizer`.
    Either may be local or gs:// (staged to a local copy: prime_jax.paths.stage)."""
    from prime_jax import paths

    path = paths.stage(path)
    if os.path.isdir(path):
        spm = os.path.join(path, "tokenizer.model")
        hf_files = ("tokenizer.json", "tokenizer_config.json")
        if os.path.isfile(spm) and not any(os.path.isfile(os.path.join(path, f)) for f in hf_files):
            return SentencePieceTokenizer(spm)
        return HFTokenizer(path)
    if path.endswith(".model") and os.path.isfile(path):
        return SentencePieceTokenizer(path)
    raise ValueError(
        f"cannot load a tokenizer from {path!r}: expected a local HF tokenizer directory "
        "or an existing sentencepiece '.model' file"
    )


def train_sentencepiece(
    texts: Iterable[str],
    out_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    chat_template: str = CHATML_TEMPLATE,
) -> SentencePieceTokenizer:
    """Train a deterministic sentencepiece model of at most `vocab_size` pieces on `texts`.

    Writes `<out_prefix>.model` / `.vocab`; a small corpus may support fewer pieces than asked for,
    so read the size back from `.vocab_size`.

    Digits are split into single tokens (arithmetic stays learnable for a tiny model), text is not
    normalised (identity rule, no dummy prefix, whitespace kept) so decode(encode(s)) == s, and with
    `byte_fallback` any character unseen in training encodes as UTF-8 byte pieces (these take 256
    ids, so `vocab_size` must leave room for them). The ChatML markers are user-defined symbols.
    Training is single-threaded so the same texts give the same model bytes.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    out_prefix = os.fspath(out_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=out_prefix,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=byte_fallback,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        user_defined_symbols=list(CHATML_SPECIAL_TOKENS),
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return SentencePieceTokenizer(out_prefix + ".model", chat_template=chat_template)
