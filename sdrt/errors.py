"""Exceptions with the meaning the CLI gives them: exit 2 for bad input, 1 for failures, 130 when interrupted."""


class SdrtError(Exception):
    """Something failed that the input did not cause (export mismatch, backend error). CLI exit 1."""

    exit_code = 1


class InputError(SdrtError, ValueError):
    """Bad arguments or input: unknown sampler, bad size, unreadable file, not a checkpoint. CLI exit 2."""

    exit_code = 2


def one_line(message) -> str:
    """A message (or exception) as one line: library messages may quote multi-line text from
    onnxruntime or the hub, and the CLI and the server answer with one line."""
    return " ".join(str(message).split())


def first_line(e: BaseException) -> str:
    """A third-party exception's message in one line (the CLI prints one line per error)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Interrupted(SdrtError):
    """The run was stopped on request (Ctrl-C, a server's interrupt or cancellation). CLI exit 130."""

    exit_code = 130


class NonFiniteOutput(SdrtError):
    """An engine gave NaN or inf (an fp16 overflow, or corrupt weights)."""
