"""The one error a user sees for a bad config, path or argument."""


class ConfigError(ValueError):
    """A bad config: the message is one line naming the field and the fix."""
