"""Final-answer extraction and matching for math-style tasks (GSM8K ``#### 42``, ``\\boxed{}``, numbers).

Matching uses ``math-verify`` for anything beyond an exact string match.
"""

from __future__ import annotations

import re

from math_verify import parse, verify

_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_answer(text: str) -> str:
    """The final answer in ``text``: ``#### X``, else the last ``\\boxed{X}``, else the last number,
    else the stripped text."""
    found = _GSM8K.findall(text)
    if found:
        return found[-1].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", "")
    return text.strip()


def is_correct(response: str, reference: str) -> bool:
    """Whether ``response``'s final answer equals ``reference``'s (exactly, or per math-verify)."""
    predicted, gold = extract_answer(response), extract_answer(reference)
    if predicted == gold:
        return True
    if not predicted or (predicted.isdigit() and gold.isdigit()):
        return False  # digit strings compare exactly: "0121" is not "121"
    return bool(verify(parse(f"${gold}$"), parse(f"${predicted}$")))
