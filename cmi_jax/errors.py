"""Errors a user causes and can fix: a bad config value, data, teacher or workdir.

Command-line entry points print the message of a `UserError` alone (`error: ...`,
exit code 2) instead of a traceback; any other exception is a bug and keeps its
traceback. Each subclass also derives from the builtin a caller would expect
(ValueError, FileNotFoundError), so `except ValueError` keeps working.
"""


class UserError(Exception):
  """Base class: the message names the bad value and the fix."""


class ConfigError(UserError, ValueError):
  """A config field holds a value the run cannot use."""


class TeacherError(UserError, ValueError):
  """The teacher (directory, card, weights) does not fit the run or is damaged."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be written, or holds a run the new command must not continue."""


def main_guard(main):
  """Wraps an absl `main(argv)`: a UserError (or a refused .pth) prints
  `error: <message>` on stderr and exits with status 2; everything else
  propagates with its traceback."""
  import functools  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  @functools.wraps(main)
  def wrapped(argv):
    from cmi_jax import convert  # pylint: disable=g-import-not-at-top
    # The converter's refusals of a damaged, unsafe or mismatched .pth are the user's too.
    user_errors = (UserError, convert.CheckpointFormatError, convert.UnsafeCheckpointError,
                   convert.CheckpointMismatchError)
    try:
      return main(argv)
    except user_errors as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(2)
  return wrapped


def parse_flags(argv):
  """absl `app.run(..., flags_parser=parse_flags)`: a bad flag value (e.g.
  `--config.kd.epochs=abc`, or a float where the typed, locked config holds an
  int), an override of a field the config lacks (`--config.kd.foo=1`) or a bad
  argument of the config file itself (`--config=configs/fashion_mnist.py:method=nosuch`)
  prints one `error:` line and exits with status 2, instead of a traceback."""
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = str(e)
    if 'Error whilst parsing config file' in msg:
      # The config file's get_config(arg) raised (e.g. an unknown method): ml_collections
      # wraps its traceback into the message; its last line is the user's error.
      last = [line for line in msg.splitlines() if line.strip()][-1]
      config = [a for a in argv[1:] if a.startswith('--config=')]
      msg = f'{config[0] if config else "--config"}: {last.split(": ", 1)[-1]}'
    elif msg.startswith('flag --config.'):
      msg += ('. The config is typed: pass a value of the type its config file gives the '
              'field (--helpfull lists every config.* flag with its value).')
  except (AttributeError, KeyError) as e:  # ml_collections: no such field in the locked config
    field = str(e).strip('"\'')
    bad = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.') and
           a.split('=')[0].rsplit('.', 1)[-1] == field.split("'")[0]]
    msg = (f'{", ".join(bad) or "a --config override"} names a field the config does not have '
           f'({e}); check the spelling against the config file (python -m <module> '
           '--config=<file> --helpfull lists every config.* flag).')
  print(f'error: {msg}', file=sys.stderr, flush=True)
  sys.exit(2)


class TeacherNotFoundError(UserError, FileNotFoundError):
  """No teacher (directory or file) at the given path, or the directory is incomplete."""


class CheckpointError(UserError, OSError):
  """No usable checkpoint to resume from, or a checkpoint could not be written
  (disk full, permissions); the message names the folder and what to do."""


class OutputError(UserError, OSError):
  """An output file cannot be written (missing or read-only folder, exists already)."""
