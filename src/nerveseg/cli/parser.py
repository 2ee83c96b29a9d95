"""The command line's argument parser: argparse that names the closest command or option.

A misspelt command (``nerveseg segmnt``) or option (``train --epoch 3``) gets "did you mean
...?" and the usage of the command it was given to, not only the top-level usage. argparse's own
``suggest_on_error`` does this from Python 3.14; this works on every supported Python and
steps aside where argparse already suggested.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import NoReturn

_INVALID_CHOICE = re.compile(r"argument (?P<name>[^:]+): invalid choice: (?P<quote>['\"])(?P<value>.*?)(?P=quote)")


def _closest(word: str, candidates: list[str]) -> str | None:
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


class SuggestingParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors suggest the closest command, choice or option.

    Sub-commands made with ``add_subparsers().add_parser`` are of the same class, so each
    suggests among its own options."""

    def _subparser(self, namespace: argparse.Namespace) -> argparse.ArgumentParser | None:
        """The sub-command parser that ``namespace`` was parsed by, if any."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                name = getattr(namespace, action.dest, None) if action.dest != argparse.SUPPRESS else None
                return action.choices.get(name) if name else None
        return None

    def _option_names(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings]

    def _guesses(self, tokens: list[str]) -> str:
        """" (--ot: did you mean --out?)" for the tokens that look like options this parser lacks."""
        options = self._option_names()
        guesses = []  # (given, closest)
        for token in tokens:
            given = token.split("=", 1)[0]
            if given.startswith("-") and len(given) > 1 and given not in options:
                guess = _closest(given, options)
                if guess:
                    guesses.append((given, guess))
        if not guesses:
            return ""
        return " (" + "; ".join(f"{given}: did you mean {guess}?" for given, guess in guesses) + ")"

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # kept for error(): a misspelt --out surfaces as "--out is required", not as unknown
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # argparse reports a sub-command's unknown option from the top parser, with the
            # top-level usage; report it from the sub-command, with a suggestion
            parser = self
            while True:
                sub = parser._subparser(parsed) if isinstance(parser, SuggestingParser) else None
                if sub is None:
                    break
                parser = sub
            message = f"unrecognized arguments: {' '.join(extras)}"
            if isinstance(parser, SuggestingParser):
                message += parser._guesses(extras)
            parser.error(message)
        return parsed

    def error(self, message: str) -> NoReturn:
        match = _INVALID_CHOICE.search(message)
        if match and "meant" not in message:  # Python 3.14+ with suggest_on_error says "maybe you meant"
            name, value = match["name"], match["value"]
            choices: list[str] = []
            for action in self._actions:
                names = {"/".join(action.option_strings), action.metavar, action.dest}
                if action.choices and name in names:
                    choices += [str(c) for c in action.choices]
            if not choices:
                choices = [str(c) for a in self._actions if a.choices for c in a.choices]
            guess = _closest(value, choices)
            if guess:
                message += f" -- did you mean {guess!r}?"
        elif message.startswith("the following arguments are required"):
            message += self._guesses(getattr(self, "_given", []))
        super().error(message)
