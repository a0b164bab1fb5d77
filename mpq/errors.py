"""The tool's own error types: every expected failure is one of these, shown as one line by the CLI."""


class MpqError(Exception):
    """A user-facing failure; the CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = 2


class ArtifactError(MpqError):
    """An artifact (or calibration folder) is malformed, corrupted, or from an unknown format version."""


class QualityGateError(MpqError):
    """The quantized model failed the quality gate; nothing was written."""

    exit_code = 3
