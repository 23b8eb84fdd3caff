"""Math outcome verifier: extract a response's final answer and compare it with the ground truth.

Extraction follows the reference (docs/prime_spec.md §2.1): the last complete `\\boxed{}` / `\\fbox{}`
wins; without one, the "answer is" / "answer:" phrases and the trailing-marker rules of the
reference pick the answer out of the text. Comparison uses math-verify (LaTeX, fractions,
decimals, percentages, intervals, sets, tuples, symbolic equivalence) after a cheap exact
match on a normalised string.

Time per call is bounded by math-verify's SIGALRM timeouts, which only work in the main thread
of a process; the verifier pool runs every item in a worker process's main thread and also kills
a worker that overruns. Called from another thread, the timeouts are off and the caller must
bound the call itself.
"""

from __future__ import annotations

import cmath
import re
import threading
from decimal import Decimal

from math_verify import parse, verify
from sympy import Basic, Expr, Float, Symbol, UnevaluatedExpr

# Reference §2.1 step 1 / step 2 phrases, and step 5 trailing markers.
_ANSWER_AFTER = ("answer:", "answer is", "answers are")
_ANSWER_BEFORE = ("is answer", "is the answer", "are answers", "are the answers")
_TRAILING_MARKERS = ("be ", "is ", "are ", "=", ": ", "get ", "be\n", "is\n", "are\n", ":\n", "get\n")
_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Longer answers are not final answers (and cost parsing time); they score 0.
_MAX_ANSWER_CHARS = 1000

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_SCIENTIFIC = re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?)[eE]([+-]?\d+)\b")
_LATEX_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|~")
_DISPLAY_DELIMS = re.compile(r"^\\[\[(]|\\[\])]$")
_PLAIN_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
# A signed number, optionally a percentage: math-verify reads `25\%` as 25 (or 0.25), but parses `-4\%`
# as the product -1 * 4 * (1/100), which it no longer recognises as a percentage.
_SIGNED_NUMBER = re.compile(r"^([+-]?)(\d+(?:\.\d+)?(?:\\?%)?)$")
# Values given in turn to the free variables (cycled) when telling two expressions apart:
# positive, irrational-looking, away from 0, 1 and the usual branch cuts.
_SAMPLE_POINTS = ((0.7317, 1.2913, 0.9127, 1.4431), (1.3719, 0.6653, 1.1786, 0.8241), (0.8893, 1.1171, 1.3357, 0.6029))


def _boxed_content(text: str, start: int) -> str | None:
    """Content of the box whose command ends at `start`: a balanced `{...}` group, or the single
    token of the `\\boxed 5` form. None if the group never closes (a truncated response)."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        j = i
        while j < len(text):
            ch = text[j]
            if ch == "\\":  # an escaped character (\{, \}) never opens or closes a group
                j += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
            j += 1
        return None
    if i == start:  # e.g. "\boxedx": not a box command
        return None
    token = re.match(r"[^\s$]+", text[i:])
    return token.group(0) if token else None


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed`/`\\fbox` in `text`, or None when there is none or it is cut off."""
    starts = [(text.rfind(cmd), cmd) for cmd in _BOX_COMMANDS]
    pos, cmd = max(starts)
    if pos < 0:
        return None
    return _boxed_content(text, pos + len(cmd))


def _answer_from_text(text: str) -> str:
    """Reference §2.1 steps 1, 2, 4, 5 on a response without a box, applied in turn:
    keep what follows an "answer is" phrase, what precedes an "is the answer" phrase, what
    precedes the last ". ", and what follows the last of each trailing marker."""
    for phrase in _ANSWER_AFTER:
        pos = text.lower().rfind(phrase)
        if pos >= 0:
            text = text[pos + len(phrase) :].strip()
    for phrase in _ANSWER_BEFORE:
        pos = text.lower().rfind(phrase)
        if pos >= 0:
            text = text[:pos].strip()
    pos = text.rfind(". ")
    if pos >= 0:
        text = text[:pos].strip()
    for marker in _TRAILING_MARKERS:
        pos = text.lower().rfind(marker)
        if pos >= 0:
            text = text[pos + len(marker) :].strip()
    return text


def _clean(answer: str) -> str:
    """Strip math delimiters, display brackets, trailing full stops and surrounding space."""
    answer = _UNESCAPED_DOLLAR.sub("", answer).strip().rstrip(".").strip()
    return _DISPLAY_DELIMS.sub("", answer).strip()


def extract_answer(response: str) -> str | None:
    """The final answer of a model response, or None when it has none.

    The last complete `\\boxed{...}`/`\\fbox{...}` (balanced braces) if present, otherwise the
    reference's text fallbacks ("answer is"/"answer:" and trailing "=", "is ", ... markers).
    """
    boxed = _last_boxed(response)
    answer = boxed if boxed is not None else _answer_from_text(response)
    answer = _clean(answer)
    return answer or None


def _normalise(answer: str) -> str:
    """Spacing- and notation-insensitive form used for the exact-match fast path."""
    answer = _LATEX_SPACING.sub("", answer)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac")):
        answer = answer.replace(old, new)
    return "".join(answer.split())


def _prepare(answer: str) -> str:
    """LaTeX math-verify can read: no `$`, scientific `4.5e33` written as `4.5\\times10^{33}`."""
    answer = _clean(answer)
    return _SCIENTIFIC.sub(r"\1\\times10^{\2}", answer)


def is_equivalent(prediction: str, ground_truth: str, *, timeout_s: int = 3) -> bool:
    """True when the extracted `prediction` and `ground_truth` denote the same answer.

    `timeout_s` bounds each math-verify parse and comparison (main thread only, see module doc).
    """
    pred, gold = _prepare(prediction), _prepare(ground_truth)
    if not pred or not gold or len(pred) > _MAX_ANSWER_CHARS:
        return False
    if _normalise(pred) == _normalise(gold):
        return True
    if _PLAIN_NUMBER.match(pred) and _PLAIN_NUMBER.match(gold):  # fast path, same verdict as math-verify
        return Decimal(pred) == Decimal(gold)
    signed = _SIGNED_NUMBER.match(_normalise(pred)), _SIGNED_NUMBER.match(_normalise(gold))
    if all(signed) and "%" in pred + gold and "-" in pred + gold:
        # A negative percentage: the signs must agree, the magnitudes compare as unsigned (`-4\%` = -4 = -0.04).
        (pred_sign, pred_abs), (gold_sign, gold_abs) = (m.groups() for m in signed)
        return pred_sign.strip("+") == gold_sign.strip("+") and is_equivalent(pred_abs, gold_abs, timeout_s=timeout_s)
    limit = timeout_s if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=limit)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=limit)
    if not gold_parsed or not pred_parsed:
        return False
    if _differ_at_sample_points(gold_parsed[0], pred_parsed[0]):
        return False
    if not verify(gold_parsed, pred_parsed, timeout_seconds=limit):
        return False
    return not _numbers_disagree(gold_parsed[0], pred_parsed[0])


def _differ_at_sample_points(gold: object, pred: object) -> bool:
    """True when two expressions, at least one in free variables, take clearly different values at
    each of a few sample points. For plain expressions math-verify can then only answer "equal"
    through `simplify(gold - pred) == 0`, which such a pair cannot satisfy; this skips that search.
    """
    if not all(isinstance(e, Expr) and not isinstance(e, Symbol) and not e.has(UnevaluatedExpr) for e in (gold, pred)):
        return False
    if not (gold.free_symbols or pred.free_symbols):  # two constants: math-verify is quick
        return False
    symbols = sorted(gold.free_symbols | pred.free_symbols, key=str)
    for point in _SAMPLE_POINTS:
        values = {s: Float(v) for s, v in zip(symbols, point * (len(symbols) // len(point) + 1))}
        try:
            g, p = complex(gold.evalf(20, subs=values)), complex(pred.evalf(20, subs=values))
        except Exception:  # not numeric at this point (unknown functions, ...): make no claim
            return False
        if not (cmath.isfinite(g) and cmath.isfinite(p)) or abs(g - p) <= 1e-6 * max(1.0, abs(g), abs(p)):
            return False
    return True


def _numbers_disagree(gold: object, pred: object) -> bool:
    """True for two numbers more than 1e-4 apart relatively (the reference's numeric tolerance).

    math-verify rounds floats to 6 decimal places, which equates any two tiny magnitudes
    (2.88e-19 and 1.325e-27); this check keeps such pairs apart.
    """
    if not (isinstance(gold, Basic) and isinstance(pred, Basic) and gold.is_number and pred.is_number):
        return False
    try:
        g, p = complex(gold.evalf(30)), complex(pred.evalf(30))
    except (TypeError, ValueError, OverflowError):
        return False
    return abs(g - p) > 1e-4 * max(abs(g), abs(p))


def is_plain_number(answer: str) -> bool:
    """"42", "-3.5", "1,000", "{42}" — a number literal, not an expression such as "6 * 7" or "2^{10}"."""
    text = _normalise(_clean(answer)).replace("{", "").replace("}", "").replace(",", "")
    return _PLAIN_NUMBER.match(text.removeprefix("+")) is not None


def score(response: str, ground_truth: str, *, literal_numbers: bool = False) -> float:
    """1.0 if the response's final answer equals `ground_truth` (LaTeX), else 0.0.

    literal_numbers: when the ground truth is a plain number, only a plain number counts as an answer
    (an unevaluated expression like `\\boxed{6 * 7}` scores 0). Off by default, as the reference grader
    (sympy) accepts expressions; on for tasks whose question contains its answer as an expression,
    where copying it into the box is a reward hack (the built-in synthetic run finds it in ~13 steps).
    """
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    if literal_numbers and is_plain_number(ground_truth) and not is_plain_number(answer):
        return 0.0
    return 1.0 if is_equivalent(answer, ground_truth) else 0.0
