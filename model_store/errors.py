"""Exceptions raised by the model store. Each message names the problem and, where
possible, the command or field that fixes it."""


class ModelStoreError(Exception):
    """Base class of every model-store error."""


class DatasetUnavailableError(ModelStoreError):
    """A dataset's offline package is not installed."""


class ZooFormatError(ModelStoreError):
    """A source zoo on disk is malformed or incomplete."""


class BundleIntegrityError(ModelStoreError):
    """A merged bundle is corrupt, partial or missing."""


class CheckpointImportError(ModelStoreError):
    """A checkpoint could not be imported (unknown layout, shape mismatch...)."""


class ImageDecodeError(ModelStoreError):
    """Bytes that are not a decodable image in a supported format."""


class ImageTooLargeError(ImageDecodeError):
    """An image above the pixel cap (decompression bombs included)."""


class DataSourceError(ModelStoreError):
    """A task's calibration or test images cannot be used (missing, empty, mislabeled...)."""


class MissingDataError(DataSourceError):
    """A method needs data that a task of the zoo does not have."""
