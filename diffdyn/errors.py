"""The one exception type for mistakes a user can fix (bad config, missing file, ...).

`launch.py` prints its message as a single line and exits with status 2; library callers
(a notebook) see an ordinary exception whose message says what to change.
"""


class UserError(Exception):
  """A problem with the user's input, with a message that names the problem and the fix."""


class RunFailed(Exception):
  """The run stopped for a reason found while training (a non-finite loss, say)."""
