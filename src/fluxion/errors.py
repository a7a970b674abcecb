"""Exception types that name what was wrong: the argument, file, key or shape."""


class FluxionError(Exception):
    """Base class for fluxion's own errors."""


class CheckpointError(FluxionError, ValueError):
    """A weights file is unsafe, corrupt, or does not match the model it is loaded into."""


class ModelNotFoundError(FluxionError, FileNotFoundError):
    """A model name or component could not be resolved to local files."""


class InputError(FluxionError, ValueError):
    """A user-supplied argument is invalid (size, strength, image, ...)."""


class ModelFolderError(FluxionError, ValueError):
    """A model folder's JSON description (fluxion.json, model_index.json, a config) is unreadable or incomplete."""
