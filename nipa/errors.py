"""The one error type for a user's mistake: a bad option, input file or combination of them.

Every entry script catches it (nipa.cli.run_main) and prints `script.py: error: <message>` with exit
code 2 and no traceback (`--debug` shows it). The message says what is wrong, where (the option, file,
line or key) and what to do. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave (options, files): the message says what, where and what to do."""
