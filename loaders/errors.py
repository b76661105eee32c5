"""The one error type the pack raises for things a user can fix."""
from __future__ import annotations


class ZImageError(ValueError):
    """A problem with the user's files or inputs.

    Built from what happened, where, what was expected, what was found and the fix, so every
    message answers the same questions in the same order.
    """

    def __init__(self, what: str, *, where: str | None = None, expected: str | None = None,
                 found: str | None = None, fix: str | None = None):
        self.what, self.where, self.expected, self.found, self.fix = what, where, expected, found, fix
        head = f"{where}: {what}" if where else what
        parts = [head.rstrip(".") + "."]
        parts += [f"{label}: {text.rstrip('.')}." for label, text in
                  (("Expected", expected), ("Found", found)) if text]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))
