"""
Session adapters that ship with chatweb, and the responders that answer in
the default one (models over treq: L{ModelResponder}).
"""

from chatweb.backends._models import ModelError, ModelResponder, Stopped
from chatweb.backends._providers import Provider, loadProviders, providerFromOptions

__all__ = [
    "ModelError",
    "ModelResponder",
    "Provider",
    "Stopped",
    "loadProviders",
    "providerFromOptions",
]
