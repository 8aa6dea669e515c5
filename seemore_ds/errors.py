"""The one error type for mistakes a user can fix; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A bad input (config value, file, argument) described in one line with the fix."""
