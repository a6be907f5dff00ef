"""The project's own error type.

GUI workers swallow ``RuntimeError`` raised inside generators (see DESIGN.md), and torch raises
``RuntimeError`` for most failures, so everything a user should read is re-raised as ``NnsegError``.
"""


class NnsegError(Exception):
    """A problem with the user's model, image or settings; the message names it and the fix."""
