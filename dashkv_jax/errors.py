"""The one exception type for input a user can fix; the CLI prints it as one line and exits 2."""


class DashKVError(ValueError):
    """Bad input: a wrong path, an unsupported model, a context that does not fit, ..."""
