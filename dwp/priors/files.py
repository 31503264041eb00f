"""Prior files: every prior saved and loaded in one validated one-file format.

A prior file holds the prior's kind (its class, looked up in a registry that every
:class:`~dwp.priors.Prior` subclass joins when it is defined), its configuration (plain
constructor arguments, :meth:`Prior.config`), its state (tensors: ``state_dict``) and its
provenance (``metadata``: how it was fitted).  :func:`load_prior` reads any prior file,
the deep weight prior's own format (``dwp.DeepWeightPrior``, which holds one VAE per
group) included, so a user never has to know which kind a file holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..io import FileFormat, LibraryFileError, check_plain, load_torch_file

if TYPE_CHECKING:
    from .base import Prior

__all__ = [
    "PRIOR_FILE",
    "PriorFileError",
    "load_prior",
    "prior_kinds",
    "register",
    "register_format",
    "save_prior",
]


class PriorFileError(LibraryFileError):
    """A saved prior file is unreadable, of another kind, or inconsistent."""


#: The generic prior file (every prior but the deep weight prior, which has its own).
PRIOR_FILE = FileFormat(
    tag="dwp.Prior",
    version=1,
    keys=("kind", "config", "state", "metadata"),
    error=PriorFileError,
    what="dwp prior",
)

_KINDS: dict[str, type[Prior]] = {}
#: Formats of their own (the deep weight prior's, SWAG moments), by tag: the format and
#: its ``loader(payload, path, **overrides)``.
_FORMATS: dict[str, tuple[FileFormat, Callable[..., Prior]]] = {}


def register(cls: type[Prior]) -> type[Prior]:
    """Make ``cls`` loadable by :func:`load_prior` under its class name (done for every
    subclass of :class:`~dwp.priors.Prior` by ``__init_subclass__``)."""
    _KINDS[cls.__name__] = cls
    return cls


def register_format(file_format: FileFormat, loader: Callable[..., Prior]) -> None:
    """Let :func:`load_prior` read files of another format (``format ==
    file_format.tag``): how a prior with its own file format joins in.

    ``loader(payload, path, **overrides)`` receives the file's contents as read once by
    :func:`load_prior` (checksum and finiteness checked, then ``file_format.check``: tag,
    version, keys) and ``path`` for its messages, and returns the prior.
    """
    _FORMATS[file_format.tag] = (file_format, loader)


def prior_kinds() -> dict[str, type[Prior]]:
    """The registered prior classes by kind name."""
    return dict(_KINDS)


def save_prior(prior: Prior, path: str | os.PathLike) -> None:
    """Write ``prior`` (a template or a site prior) to one file, atomically."""
    config = prior.config()
    check_plain(config, f"{type(prior).__name__}.config()")
    metadata = dict(getattr(prior, "metadata", {}) or {})
    check_plain(metadata, f"{type(prior).__name__}.metadata")
    PRIOR_FILE.save(
        {
            "kind": type(prior).__name__,
            "config": config,
            # with the extra state: the prior's type, checked again on loading
            "state": {
                k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                for k, v in prior.state_dict().items()
            },
            "metadata": metadata,
        },
        path,
    )


def load_prior(path: str | os.PathLike, **overrides: Any) -> Prior:
    """Read any prior file: the generic format or the deep weight prior's.

    ``overrides`` replace saved constructor arguments (e.g. ``n_samples=`` of a deep weight
    prior).  Errors (:class:`PriorFileError`) name the file: a truncated or corrupt file
    (its checksum does not match: also a :class:`dwp.io.CorruptFileError`), NaN or
    infinite values (naming the tensor), an unknown kind, a configuration the class
    rejects, a state that does not fit.
    """
    payload = load_torch_file(path, what="prior file", error=PriorFileError)
    tag = payload.get("format") if isinstance(payload, dict) else None
    if tag in _FORMATS:
        file_format, loader = _FORMATS[tag]
        # the payload, not the path: a moments file of several MB is read once
        return loader(file_format.check(payload, path), path, **overrides)
    payload = PRIOR_FILE.check(payload, path)
    kind = payload["kind"]
    cls = _KINDS.get(kind)
    if cls is None:
        raise PriorFileError(
            f"{path}: prior kind {kind!r} is not known to this dwp (known: {sorted(_KINDS)})"
        )
    try:
        prior = cls.from_config({**payload["config"], **overrides}, payload["state"])
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise PriorFileError(f"{path}: invalid {kind}: {error}") from error
    if hasattr(prior, "metadata"):
        prior.metadata = dict(payload["metadata"])
    return prior
