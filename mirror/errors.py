"""The one exception type the CLI turns into a single line and exit status 2."""


class UsageError(Exception):
    """Bad input or an unusable host, found before (or instead of) touching the kernel.

    The message names the problem and, where there is one, the fix."""
