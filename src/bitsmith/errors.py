"""The one exception type users see: its message is a single line naming the problem."""

__all__ = ["BitsmithError"]


class BitsmithError(Exception):
    """A problem with the user's input (path, checkpoint, recipe, model), not a bug in bitsmith."""
