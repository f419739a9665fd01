"""Errors a user can cause: printed by the CLI as one line, without a traceback."""


class PetctError(Exception):
    """Bad input or setting. The message names the file, case or setting at fault."""
