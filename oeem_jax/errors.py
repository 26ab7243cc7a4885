"""The errors of oeem_jax that `python -m oeem_jax.main` reports as one `error: ...` line with exit
status 2 (bad input, a bad config value, a missing optional install), and the training failure
`NonFiniteLossError`. Modules raise these from here. Not errors of input, and so elsewhere: the
command line's own `main.UsageError` and the preemption exit `engine.train.Preempted`.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A config value a stage cannot run with.

  Attributes:
    key: dotted config key, e.g. "seg.loss_kind" (inside a pipeline "stage_seg.seg.loss_kind").
    given: what was given, already quoted (e.g. "'foo'", "-5").
    expected: what would be accepted.
  """

  def __init__(self, key: str, given: str, expected: str):
    self.key, self.given, self.expected = key, given, expected
    super().__init__(f"config key {key}: {given}; expected {expected}")

  def with_prefix(self, prefix: str) -> "ConfigError":
    """The same error with `prefix` (e.g. "stage_seg.") in front of the key."""
    err = ConfigError(prefix + self.key, self.given, self.expected)
    err.__cause__ = self.__cause__
    return err


class GlasDataError(ValueError):
  """A GlaS source folder (or config) that does not match what the loader expects."""


class InputError(GlasDataError):
  """An input image (or model folder, or `predict` config value) that cannot be used as given.

  A `GlasDataError` subclass, so `oeem_jax.main` reports it as one `error:` line with exit status 2.
  """


class MissingExtraError(ImportError):
  """An optional dependency (torch, a weight package) is not installed; the message gives the pip
  command. `oeem_jax.main` prints it as one `error:` line (exit status 2)."""


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm of a training step was NaN or infinite."""
