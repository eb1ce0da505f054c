"""The one exception type for bad user input.

Stages catch it at the edge, print ``error: <message>`` as a single line and exit
with status 2. Messages say what is wrong and how to fix it.
"""


class UserError(Exception):
    pass


class Interrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after saving what it needs to resume.

    Stages print one line and exit 130 (the shell's code for an interrupt)."""
