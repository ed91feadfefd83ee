"""User-facing errors: one clear line naming the file and what to do, never a traceback."""


class CflowInputError(Exception):
    """Bad or missing user input (file, folder, layout, option).

    The message is shown to the user as a single line, so it names the offending
    path and says how to fix it.
    """


class ImageTooLargeError(CflowInputError):
    """An image above the pixel limit: a service answers 413 rather than 400."""


class ImageFormatError(CflowInputError):
    """An image in a format the service does not take, known by its content: 415 like a wrong content type."""


class BrokenModelError(CflowInputError):
    """The model, not the image, is at fault (a non-finite score): a batch skips the image, a service answers
    500, since a client cannot fix it by sending another image."""
