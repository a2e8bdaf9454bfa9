"""
Session adapters that ship with chatweb.
"""
