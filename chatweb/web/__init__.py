"""
chatweb's HTTP side: the Klein routes of chat.nvim's API (L{ChatWebAPI}), and
the site that enforces the body limit before a route runs (L{ChatWebSite}).
"""

from chatweb.web._api import ChatWebAPI, checkAPIKeys
from chatweb.web._hosts import normalizeAllowedHost
from chatweb.web._site import ChatWebSite, describeAddress

__all__ = ["ChatWebAPI", "ChatWebSite", "checkAPIKeys", "describeAddress", "normalizeAllowedHost"]
