"""The expected failures besides params problems (rlhf.config.params.ParamsError); each message is one line for the user. Torch-free,
so the command line catches them without importing the model code."""


class ModelError(RuntimeError):
    """A model could not be made available or does not fit the params; the message is one line for the user."""


class StateError(RuntimeError):
    """The project's iteration state is missing or inconsistent; one line for the user."""


class ArtifactError(RuntimeError):
    """A parquet artifact or data file is missing, unreadable or breaks its schema; the message names the file."""


class PeerError(StateError):
    """A data-parallel rank lost the others: a node or process died, the network failed, or a peer did not answer
    within runtime.peer_timeout. One line for the user, naming where the process group met."""
