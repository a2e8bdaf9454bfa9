"""
Rendering, pure: a session in, HTML out (the session page, the index of a
share link, Markdown and highlighted code).  Nothing here imports Twisted.
"""

from chatweb.render._preview import (
    SECURITY_HEADERS,
    highlightCode,
    plainText,
    renderIndex,
    renderMarkdown,
    renderSession,
    renderSessionInline,
)

__all__ = [
    "SECURITY_HEADERS",
    "highlightCode",
    "plainText",
    "renderIndex",
    "renderMarkdown",
    "renderSession",
    "renderSessionInline",
]
