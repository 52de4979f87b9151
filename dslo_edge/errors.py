"""Exceptions raised by dslo-edge.

Every error the runtime raises on purpose derives from ``DsloError``, so the
CLI can print one line and exit non-zero::

    DsloError
    ├── ConfigError          device TOML or CLI input is invalid
    │   └── StateDirInUse    another process holds a state directory's lock
    ├── BundleError          bundle missing, corrupt or incompatible
    │   └── RuntimeMissing   no interpreter package (also a ConfigError)
    ├── ConversionError      a Keras model cannot become a trainable bundle
    │   ├── RepresentativeDataError  int8 calibration samples do not fit the models
    │   └── TrainableScopeError      the trainable scope does not fit the student
    ├── OutputPathError      an output folder or file cannot be created or written
    ├── InvalidUpdate        a soft-label payload failed decoding or validation
    ├── InvalidRequest       a label request failed decoding or validation
    └── BrokerError          an MQTT broker could not be started or reached
"""

from __future__ import annotations


class DsloError(Exception):
    """Root of all errors raised on purpose by dslo-edge."""


class ConfigError(DsloError):
    """Invalid configuration file or option value."""


class StateDirInUse(ConfigError):
    """Another process, such as a running daemon, holds a state directory's lock.

    Attributes:
        owner: the holder's line from the lock file, such as
            "pid 4242, device porch", or "owner unknown".
    """

    def __init__(self, message: str, owner: str):
        super().__init__(message)
        self.owner = owner


class BundleError(DsloError):
    """A model bundle is missing, corrupt or does not match what is expected."""


class RuntimeMissing(BundleError, ConfigError):
    """No LiteRT interpreter package can be imported.

    It is a ``ConfigError`` too, so the CLI exits with status 78 and systemd
    does not restart a daemon that cannot start until a package is installed.
    """


class ConversionError(DsloError):
    """A Keras teacher or student cannot be converted into a bundle."""


class RepresentativeDataError(ConversionError):
    """Samples for int8 calibration have another shape, none, or NaN values.

    The CLI reports it as an invalid ``--representative`` file, with exit
    status 78 like other input files that lack what the command expects.
    """


class TrainableScopeError(ConversionError):
    """A trainable scope selects layers that the student does not have.

    The scope names a missing layer, more layers than the student has with
    weights, or only layers without weights.

    The CLI reports it as an invalid ``--trainable`` value, with click's usage
    message and exit status 2, like other option values outside their range.
    """


class OutputPathError(DsloError):
    """An output path cannot be created or written, such as a read-only folder.

    The CLI reports it as an invalid value of ``option``, with click's usage
    message and exit status 2, like other option values it does not accept.

    Attributes:
        option: the command-line option that named the path, such as
            ``"--out"``, or None when a library caller passed it.
    """

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class InvalidUpdate(DsloError):
    """A soft-label update was rejected.

    Attributes:
        reason: short machine-readable rejection kind, used as a metrics
            counter name (for example ``"non_finite"``).
        message_id: hex id of the update when it could be decoded, else None.
    """

    def __init__(self, reason: str, detail: str, message_id: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.message_id = message_id


class InvalidRequest(DsloError):
    """A label request from a device was rejected by the hub.

    Attributes:
        reason: short machine-readable rejection kind, such as ``"truncated"``.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class BrokerError(DsloError):
    """An MQTT broker could not be started, reached or used."""
