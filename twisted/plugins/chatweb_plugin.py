"""
The twistd plugin: C{twistd -n chatweb}.  Kept tiny: every twistd run imports
it; chatweb itself is imported only when the plugin is used.
"""

from twisted.application.service import ServiceMaker

chatweb = ServiceMaker(
    "chatweb",
    "chatweb.tap",
    "Push messages into chat sessions over HTTP (chat.nvim's HTTP API).",
    "chatweb",
)
