"""The base of the library's settings dataclasses, which are also the config's schemas (Hydra types the config
with them, ``stages/config.py``): a field without a default is required, every other default lives in the
dataclass only. Each class states its value rules once (:meth:`Settings.rules`); :meth:`Settings.check`
raises every broken one."""
from __future__ import annotations

from typing import Sequence


def choose(options: Sequence[str]) -> str:
    """``choose a, b or c``: what a rule says about a value that is not one of ``options``."""
    return f"choose {', '.join(options[:-1])} or {options[-1]}"


class Settings:
    """Mixed into a settings dataclass: ``rules()`` lists (parameter, its value is fine, what it must be)."""

    def rules(self) -> list[tuple[str, bool, str]]:
        return []

    def problems(self) -> list[str]:
        """One ``param=value: what it must be`` per broken rule (another parameter is named in `backquotes`)."""
        return [f"{name}={getattr(self, name)}: {why}" for name, ok, why in self.rules() if not ok]

    def check(self) -> None:
        """A ValueError with one line per broken rule (:meth:`problems`), before anything runs."""
        problems = self.problems()
        if problems:
            raise ValueError("\n".join(problems))
