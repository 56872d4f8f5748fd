"""The one error type for mistakes a user can fix (bad params, bad data, missing inputs)."""


class PipelineError(Exception):
    """Raised with what was wrong, where (file, key, image path) and what to do about it."""
