"""Errors that reach the user as one clear message: a user error (CLI exit code 2) or a diverged run (exit 1)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: a bad recipe, a missing file, an unknown component.

    The CLI prints the message alone (no traceback unless ``--debug``) and exits with code 2.
    """


class RecipeError(UserError):
    """A recipe that does not validate. The message names the file, the key path and the fix."""

    def __init__(self, message: str, *, path: str = "", source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        key = f"{path}: " if path else ""
        super().__init__(f"{where}{key}{message}")
        self.path = path
        self.source = source


class Diverged(Exception):
    """Training produced a non-finite loss, gradient norm or weight. Raised on every rank at once (the check is
    all-reduced), before the optimizer step and before anything is written, so the newest checkpoint on disk is
    finite. The CLI prints the message alone and exits with code 1."""
