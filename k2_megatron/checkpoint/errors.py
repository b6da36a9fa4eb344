"""The errors of every checkpoint, Hugging Face files and megatron dist_checkpointing directories alike.

``CheckpointError`` is a ValueError: the input (a directory, a file, a pointer) is not a checkpoint that can be
used here; the message names the file and the tensor(s) or fields concerned.
"""


class CheckpointError(ValueError):
    """A checkpoint directory or file is unusable (or an output would overwrite one without permission)."""


class CheckpointCorruptError(CheckpointError):
    """Files of the checkpoint are missing, truncated or altered."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for a different model, layout or format version."""


class CheckpointUnsafeError(CheckpointError):
    """The checkpoint holds pickled data that could run code when loaded (refused before unpickling it)."""


class CheckpointSaveError(CheckpointError):
    """A save could not be written (a full disk, a lost permission): nothing was published, the temporary directory
    is removed, and ``latest`` still names the previous checkpoint."""
