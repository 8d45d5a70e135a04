"""Argument types for the CLI: every number and name is checked where it enters, before any work.

A bad value is one ``esparse: error:`` line naming the flag and what it accepts (exit code 2), never a
traceback from deep inside and never a silently disabled feature (``--iters -1``, ``--alpha nan``).
"""

from __future__ import annotations

import argparse
import math
import re

INT_MAX = 2**63 - 1  # every count, size and seed esparse takes ends up in an int64 (a torch size or seed)


def int_at_least(low: int, high: int = INT_MAX):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {low}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{text} is above the maximum {high}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"{text} is outside {bracket}{low}, {high}]")
        return value

    parse.__name__ = "number"
    return parse


def temperature(text: str) -> float:
    """0 (greedy) or a sampling temperature in [1e-4, 100]: below that, logits / T overflow to inf and the
    sampler would divide inf by inf."""
    value = float_in(0.0, 100.0)(text)
    if 0 < value < 1e-4:
        raise argparse.ArgumentTypeError(f"{text} is too small to sample with: use 0 for greedy decoding or a "
                                         "temperature of at least 1e-4")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated positive integers (``--batches 1,4,16``)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and 0 < int(p) <= INT_MAX for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated positive integers, e.g. 1,4,16")
    return [int(p) for p in parts]


def device(text: str) -> str:
    """cpu, cuda, cuda:N or auto."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda, cuda:N or auto")
    return text


def prompt(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise argparse.ArgumentTypeError("the prompt is not valid UTF-8 text: pass it in UTF-8") from None
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty: give some text")
    return text


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` that shows each option's default, as "(default: X)", where there is one to show: a default of
    None or False (flags; "the method's preset") is left to the help text, which says what it means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default is None \
                or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (esparse.devices.set_threads), shared by the commands that compute on the CPU."""
    parser.add_argument("--threads", type=int_at_least(1), default=None, metavar="N",
                        help="CPU threads torch may use (default: torch's choice, one per core); on a machine "
                             "shared with other jobs fewer, even 1, is often faster")


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one ``esparse: error:`` line, exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"esparse: error: {self.prog.removeprefix('esparse ')}: {message} (see {self.prog} --help)\n")
