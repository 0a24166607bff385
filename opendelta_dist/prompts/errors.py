"""Errors of the prompt-learning half (templates, verbalizers, prompt models).

Each names what was wrong and what to do instead; all derive from :class:`PromptError`, itself an
:class:`~opendelta_dist.errors.OpenDeltaError` and a ``ValueError``, so a caller catches the family at once.
"""

from __future__ import annotations

from opendelta_dist.errors import OpenDeltaError


class PromptError(OpenDeltaError, ValueError):
    """Base class of every prompt-learning error."""


class TemplateError(PromptError):
    """A template text or piece is invalid: unbalanced braces, an unknown key or placeholder, no mask where one
    is needed, a ``soft_id`` used before it is defined, Python code where only data is accepted."""


class VerbalizerError(PromptError):
    """Label words or classes are invalid: a word that tokenises to nothing (or only to the unknown token),
    classes that do not match the data's labels, a label word list of the wrong shape."""


class WrappingError(PromptError):
    """An example cannot be turned into model inputs: still too long after truncation, a lost prediction
    position, a tokenizer the wrapper does not know."""
