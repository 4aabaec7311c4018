"""Errors that a user can fix: the command line prints their message alone
(no traceback) and exits with status 2. Every other exception is a bug and
keeps its traceback."""


class UserError(ValueError):
  """A mistake in the config, the data, the workdir or the command; the
  message names it and says what to do."""


class ConfigError(UserError):
  """A config value that cannot work, named with its field."""
