"""The two failures a run reports as one line (see docs/design.md, "Errors"), and model loading that fails
as one of them. Every module may import this one; it imports nothing from clif."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(Exception):
    """A mistake in the user's input: reported as one line on stderr with exit code 2."""


class RunFailed(Exception):
    """A run that cannot go on (e.g. a non-finite loss): one line on stderr, exit code 1."""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (as huggingface_hub reads it): only models in the local hub cache load."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def loading(what: str, name: str, errors: tuple = (OSError, ValueError)) -> Iterator[None]:
    """Load a model by hub id or path: its warnings and log records silenced (open_clip logs a failed download
    at ERROR before raising), its failure one UserError line naming it."""
    import logging
    import warnings

    silenced = logging.root.manager.disable
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.ERROR)
            yield
    except errors as err:
        hint = " (HF_HUB_OFFLINE is set: only cached hub models load)" if hub_offline() else ""
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load {what} {name!r}: {first}{hint}") from None
    finally:
        logging.disable(silenced)
