"""Command-line entry points (absl); the only code that reads whole configs."""
