"""Argument parsing shared by the bench command lines."""

from __future__ import annotations

import argparse


def positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: "1,8,64" (or spaces) -> (1, 8, 64); a clear error unless all are positive ints."""
    try:
        values = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def sorted_positive_ints(text: str) -> tuple[int, ...]:
    """As positive_ints, ascending and without repeats."""
    return tuple(sorted(set(positive_ints(text))))
