"""One error type for bad user input, so every front end can print it as a single line."""


class RetiaError(ValueError):
    """Bad input (a path, an arch, a flag value). Its message names the value and what was expected."""


def expect(condition: bool, message: str) -> None:
    """Raise :class:`RetiaError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise RetiaError(message)
