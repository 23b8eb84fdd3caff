"""Host-side layout of a step's sequences for the device passes over whole sequences (reference, PRM, PPO).

A *sequence* is one response row's real prompt tokens followed by its response tokens (up to and including
the stop: `mask` = 1). The passes read `[M, k, r, L]` slots: M mini-batches (one optimiser step each, their
rows chosen by the program's own order), k micro-batches per mini-batch (gradients accumulated exactly),
r rows of L slots per micro-batch. `train.layout` picks one of three layouts:

- packed (default): each mini-batch's sequences are packed first-fit-decreasing into rows of
  L = `train.pack_length` slots, several per row, told apart by segment ids 1, 2, ... (0 = empty slot), with
  positions restarting at 0 in each; a micro-batch holds at most `<pass>.micro_batch_tokens` / L rows.
  Rows without response tokens (padding groups) are left out: they carry no loss.
- padded: one sequence per row in the batch's own layout (left-padded prompt, right-padded response),
  `<pass>.micro_batch_size` rows per micro-batch (comparison and debugging).
- shared_prompt: each prompt once per micro-batch. A micro-batch holds `<pass>.micro_batch_size` responses, one a
  row of L = R slots (the prompt's last token, then the response but its last token), and beside them the
  `prefix_*` arrays [M, k, g, P - 1]: the distinct prompts of those rows but their last token, one a row, which
  `prefix_of` [M, k, r, g] (one-hot) ties to the responses (`Decoder.shared_prompt_hidden_states`). The n samples of
  a prompt share its tokens: the prompt's layers run once for them, not n times, and no LM head runs on it. g is
  the smallest of r / 8, r / 4, r / 2, r (whole dp) holding every micro-batch's prompts; rows of one prompt are
  put in the same micro-batch where they fit.

`index` maps each slot that predicts a response token to that token's flat position b * R + j in the
[B, R] layout the losses use (B * R: the slot predicts nothing), `Layout.unpack` the other way; `to_slots` /
`from_slots` move per-token arrays between the two layouts on device with gathers (no scatters: slow on
TPU, and opaque to XLA's cost analysis), so RLOO, whitening and the losses keep their maths.

Static shapes (packed): while a mini-batch fits one micro-batch, k = 1 and r is the smallest of r_max / 8,
r_max / 4, r_max / 2, r_max (rounded up to whole dp) that holds its rows, r_max = the budget's rows; beyond
that, r = r_max and k the smallest of 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ... (powers of two times 1, 1.25,
1.5, 1.75: at least 2/3 full, 4/5 from k = 4 on) that holds them, at most k_max = ceil(mini_batch_size / r_max),
as a row holds at least one sequence. `PackSpec.shapes()` lists them: a program compiles at most
4 + 4 ceil(log2 k_max) times per prompt/response limits (the tiny config: 4 shapes for each pass; qwen7b: 16).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LAYOUT_KEYS = ("tokens", "segment_ids", "positions", "targets", "index")
PREFIX_KEYS = ("prefix_tokens", "prefix_segment_ids", "prefix_of")   # the shared-prompt layout's prompts
LAYOUTS = ("packed", "padded", "shared_prompt")


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """How one pass lays out its sequences. name: its config section ("prm", "actor"), for error messages.

    layout "packed": several sequences per row of `row_length` slots, at most `micro_batch_tokens` slots per
    micro-batch; "padded": one left-padded sequence per row, `micro_batch_size` rows per micro-batch;
    "shared_prompt": `micro_batch_size` response rows per micro-batch beside their distinct prompts (`LAYOUTS`).
    """

    name: str
    mini_batch_size: int
    micro_batch_size: int
    data_parallel: int
    layout: str = "packed"
    row_length: int = 0
    micro_batch_tokens: int = 0

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"{self.name} layout {self.layout!r}: expected one of {LAYOUTS}")

    @property
    def packed(self) -> bool:
        return self.layout == "packed"

    def prompt_rows(self, prompts: int) -> int:
        """Shared prompt: the prompt rows g per micro-batch for at most `prompts` distinct prompts in one, the
        smallest of micro / 8, micro / 4, micro / 2, micro (whole dp) holding them."""
        dp, r = self.data_parallel, self.micro_batch_size
        return next(g for g in sorted({-(-r // (2 ** i * dp)) * dp for i in range(4)}) if g >= prompts)

    @property
    def max_rows(self) -> int:
        """Rows per micro-batch at the full token budget (packed)."""
        return self.micro_batch_tokens // self.row_length

    def shapes(self) -> list[tuple[int, int]]:
        """Every (k, r) a packed step may take, smallest first."""
        dp, r_max = self.data_parallel, self.max_rows
        rows = sorted({min(r_max, -(-r_max // (2 ** i * dp)) * dp) for i in range(4)})
        k_max = -(-self.mini_batch_size // r_max)
        ks = sorted({min(m * 2 ** i // 4, k_max) for i in range(1, max(1, k_max).bit_length() + 1) for m in (4, 5, 6, 7)})
        return [(1, r) for r in rows] + [(k, r_max) for k in ks if k > 1]

    def shape_for(self, rows: int) -> tuple[int, int]:
        """The smallest (k, r) of `shapes()` holding `rows` rows per mini-batch."""
        return next(s for s in self.shapes() if s[0] * s[1] >= rows)


class Layout(NamedTuple):
    """arrays: LAYOUT_KEYS -> [M, k, r, L] int32; unpack: [B, R] int32, the flat slot predicting each response
    token (M * k * r * L: none; the last one when a row is in several mini-batches); real_tokens: prompt +
    response tokens of the trained sequences (each counted once per mini-batch it is in)."""

    arrays: dict[str, np.ndarray]
    unpack: np.ndarray
    real_tokens: int

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots computed (above 1 where prompts are shared: a prompt's slots serve n sequences)."""
        computed = sum(self.arrays[k].size for k in ("tokens", "prefix_tokens") if k in self.arrays)
        return self.real_tokens / max(1, computed)


def lay_out(batch: dict[str, np.ndarray], minibatches: np.ndarray, spec: PackSpec) -> Layout:
    """The slots of one pass: batch holds prompt_tokens, prompt_mask [B, P] (left-padded), tokens, mask [B, R]
    (mask = 1 on a prefix of each row); minibatches [M, mini] the row ids of each mini-batch, in order.

    Raises ValueError naming the config key for a sequence longer than train.pack_length.
    """
    prompt_mask = np.asarray(batch["prompt_mask"]) > 0
    mask = np.asarray(batch["mask"]) > 0
    r_len = mask.sum(axis=1)
    if not np.array_equal(mask, np.arange(mask.shape[1])[None] < r_len[:, None]):
        raise ValueError("batch mask: the response mask must be 1 on a prefix of each row")
    p_len = prompt_mask.sum(axis=1)
    if np.any((r_len > 0) & (p_len == 0)):
        raise ValueError(f"batch prompt_mask: rows {np.flatnonzero((r_len > 0) & (p_len == 0)).tolist()} have a "
                         "response but an empty prompt")
    minibatches = np.asarray(minibatches)
    trained = r_len[minibatches.reshape(-1)] > 0
    real = int((p_len + r_len)[minibatches.reshape(-1)][trained].sum())
    arrays = (_packed(batch, prompt_mask, p_len, r_len, minibatches, spec) if spec.packed else
              _shared_prompt(batch, prompt_mask, p_len, r_len, minibatches, spec) if spec.layout == "shared_prompt"
              else _padded(batch, prompt_mask, mask, minibatches, spec))
    index = arrays["index"].reshape(-1)
    slot = np.flatnonzero(index < mask.size)
    unpack = np.full(mask.size, index.size, np.int32)
    unpack[index[slot]] = slot
    return Layout(arrays, unpack.reshape(mask.shape), real)


def _padded(batch: dict[str, np.ndarray], prompt_mask: np.ndarray, mask: np.ndarray, minibatches: np.ndarray,
            spec: PackSpec) -> dict[str, np.ndarray]:
    """One row per sequence, [left-padded prompt | right-padded response]; [M, mini / micro, micro, P + R]."""
    b, p = prompt_mask.shape
    r = mask.shape[1]
    tokens = np.concatenate([batch["prompt_tokens"], batch["tokens"]], axis=1).astype(np.int32)
    segment_ids = np.concatenate([prompt_mask, mask], axis=1).astype(np.int32)
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    index = np.full(tokens.shape, b * r, np.int32)
    index[:, p - 1:-1] = np.where(mask, np.arange(b)[:, None] * r + np.arange(r)[None], b * r)
    rows = minibatches.reshape(-1)
    shape = (minibatches.shape[0], -1, spec.micro_batch_size, p + r)
    return {k: v[rows].reshape(shape) for k, v in zip(LAYOUT_KEYS, (tokens, segment_ids, positions, targets, index))}


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of item ids) of total length <= capacity: items longest first, each into the first bin with
    room (at most 11/9 OPT + 1 bins)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        j = next((j for j, f in enumerate(free) if f >= n), None)
        if j is None:
            bins.append([])
            free.append(capacity)
            j = len(bins) - 1
        bins[j].append(int(i))
        free[j] -= n
    return bins


def _packed(batch: dict[str, np.ndarray], prompt_mask: np.ndarray, p_len: np.ndarray, r_len: np.ndarray,
            minibatches: np.ndarray, spec: PackSpec) -> dict[str, np.ndarray]:
    """Sequences of each mini-batch packed into rows of spec.row_length slots; [M, k, r, L]."""
    length, r = spec.row_length, batch["mask"].shape[1]
    seq_len = p_len + r_len
    too_long = np.flatnonzero((r_len > 0) & (seq_len > length))
    if too_long.size:
        i = int(too_long[np.argmax(seq_len[too_long])])
        raise ValueError(f"config.train.pack_length={length}: row {i} has a sequence of {seq_len[i]} tokens "
                         f"(prompt {p_len[i]} + response {r_len[i]}) that does not fit a packed row")
    rows_of = []
    for rows in minibatches:
        rows = rows[r_len[rows] > 0]
        rows_of.append([rows[b].tolist() for b in first_fit_decreasing(seq_len[rows], length)])
    k, per_micro = spec.shape_for(max((len(bins) for bins in rows_of), default=1))
    out = {key: np.zeros((len(rows_of), k * per_micro, length), np.int32) for key in LAYOUT_KEYS}
    out["index"][:] = len(r_len) * r
    for m, bins in enumerate(rows_of):
        for q, seqs in enumerate(bins):
            o = 0
            for s, b in enumerate(seqs, start=1):
                p, n = int(p_len[b]), int(r_len[b])
                sl = slice(o, o + p + n)
                out["tokens"][m, q, sl] = np.concatenate([batch["prompt_tokens"][b][prompt_mask[b]], batch["tokens"][b, :n]])
                out["segment_ids"][m, q, sl] = s
                out["positions"][m, q, sl] = np.arange(p + n)
                pred = slice(o + p - 1, o + p + n - 1)   # slot o + p - 1 + j predicts response token j
                out["targets"][m, q, pred] = batch["tokens"][b, :n]
                out["index"][m, q, pred] = b * r + np.arange(n)
                o += p + n
    return {key: v.reshape(len(rows_of), k, per_micro, length) for key, v in out.items()}


def _shared_prompt(batch: dict[str, np.ndarray], prompt_mask: np.ndarray, p_len: np.ndarray, r_len: np.ndarray,
                   minibatches: np.ndarray, spec: PackSpec) -> dict[str, np.ndarray]:
    """Each mini-batch's responses in micro-batches of spec.micro_batch_size rows (rows of one prompt together),
    one a row of R slots, and each micro-batch's distinct prompts but their last token, one a row of P - 1 slots;
    LAYOUT_KEYS [M, k, r, R] and PREFIX_KEYS [M, k, g, P - 1], [M, k, r, g]."""
    b, r = batch["mask"].shape
    lp = max(prompt_mask.shape[1] - 1, 1)
    prompts = np.where(prompt_mask, batch["prompt_tokens"], -1)
    _, group = np.unique(np.concatenate([prompts, p_len[:, None]], axis=1), axis=0, return_inverse=True)
    group = np.where(r_len > 0, group.reshape(-1), np.iinfo(np.int64).max)   # no response: no prompt, last
    rows = np.stack([m[np.argsort(group[m], kind="stable")] for m in np.asarray(minibatches)])
    rows = rows.reshape(len(rows), -1, spec.micro_batch_size)                   # [M, k, r]
    trained = [ids[r_len[ids] > 0] for ids in rows.reshape(-1, rows.shape[2])]   # per micro-batch
    g = spec.prompt_rows(max(len(np.unique(group[ids])) for ids in trained))
    out = {key: np.zeros((*rows.shape, r), np.int32) for key in LAYOUT_KEYS}
    out["index"][:] = b * r
    out.update({key: np.zeros(shape, np.int32) for key, shape in
                zip(PREFIX_KEYS, ((*rows.shape[:2], g, lp), (*rows.shape[:2], g, lp), (*rows.shape, g)))})
    for (m, q), ids in zip(np.ndindex(rows.shape[:2]), trained):
        _, first, slot = np.unique(group[ids], return_index=True, return_inverse=True)   # prompt row of each response
        for j, row in enumerate(ids[first]):
            p = int(p_len[row])
            out["prefix_tokens"][m, q, j, :p - 1] = batch["prompt_tokens"][row][prompt_mask[row]][:-1]
            out["prefix_segment_ids"][m, q, j, :p - 1] = 1
        for s, (row, j) in enumerate(zip(ids, slot.reshape(-1))):   # trained rows first: the sort put the rest last
            p, n = int(p_len[row]), int(r_len[row])
            out["prefix_of"][m, q, s, j] = 1
            out["tokens"][m, q, s, :n] = np.concatenate([batch["prompt_tokens"][row][prompt_mask[row]][-1:],
                                                         batch["tokens"][row, :n - 1]])
            out["segment_ids"][m, q, s, :n] = 1
            out["positions"][m, q, s, :n] = p - 1 + np.arange(n)
            out["targets"][m, q, s, :n] = batch["tokens"][row, :n]
            out["index"][m, q, s, :n] = row * r + np.arange(n)
    return out


# --- device side -----------------------------------------------------------------------------------------

def to_slots(x: jax.Array, index: jax.Array) -> jax.Array:
    """Per-token values x [B, R] (or per-row [B] with index // R) at the slots `index` [...] points to (0 where
    it points nowhere). -> [...]"""
    return x.reshape(-1).at[index].get(mode="fill", fill_value=0)


def from_slots(values: jax.Array, unpack: jax.Array) -> jax.Array:
    """Slot values [...] back in the [B, R] layout of `unpack` (`Layout.unpack`; 0 where no slot maps). -> [B, R]"""
    return values.reshape(-1).at[unpack].get(mode="fill", fill_value=0)


def segment_cumsum(x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Running sums of x along the last axis, restarting where the segment id changes: x, segment_ids [..., L]
    -> [..., L]. An associative scan (slices and adds only), so its gradient has no scatter either."""
    start = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], jnp.bool_),
                             segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)

    def combine(a, b):
        return a[0] | b[0], jnp.where(b[0], b[1], a[1] + b[1])

    return jax.lax.associative_scan(combine, (start, x), axis=x.ndim - 1)[1]
