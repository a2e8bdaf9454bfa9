"""
The model providers a session may use: one from the command line
(C{--responder openai --base-url ... --model ...}) or several named ones
from a TOML file (C{--providers FILE}).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from typing import Any, Mapping

import attrs

from chatweb.config import ConfigError, readSecretFile

#: The standard library's TOML reader (tomli before Python 3.11).
tomllib: Any = importlib.import_module(
    "tomllib" if sys.version_info >= (3, 11) else "tomli"
)

#: What each protocol needs by default.
PROTOCOLS: dict[str, dict[str, str]] = {
    "openai": {"base_url": "https://api.openai.com/v1", "key_env": "OPENAI_API_KEY"},
    "anthropic": {
        "base_url": "https://api.anthropic.com/v1",
        "key_env": "ANTHROPIC_API_KEY",
    },
}

DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_TOKENS = 4096


class Secret:
    """
    A provider's key: its C{repr} and C{str} never show it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@attrs.frozen
class Provider:
    """
    One model server: how to talk to it (C{protocol}: openai or anthropic),
    where, with which key, and the model used when a session names none.
    """

    name: str
    protocol: str
    baseUrl: str
    model: str | None = None
    models: tuple[str, ...] = ()
    key: Secret | None = attrs.field(default=None, repr=False)
    systemPrompt: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    maxTokens: int = DEFAULT_MAX_TOKENS

    def listing(self) -> dict[str, Any]:
        """
        What C{GET /providers} says of it.
        """
        models = list(self.models)
        if self.model is not None and self.model not in models:
            models.insert(0, self.model)
        return {"name": self.name, "protocol": self.protocol, "models": models}


def _readKeyFile(path: str) -> Secret:
    return Secret(readSecretFile(path, "the provider key file"))


def _readText(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the {what} {path!r}: {e}") from None


def _checkUrl(url: str, where: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: base URL must start with http:// or https://, not {url!r}")
    return url.rstrip("/")


def providerFromOptions(
    protocol: str,
    baseUrl: str | None = None,
    model: str | None = None,
    keyFile: str | None = None,
    systemPrompt: str | None = None,
    systemPromptFile: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    environ: Mapping[str, str] = os.environ,
) -> Provider:
    """
    The one provider the command line describes; its key comes from
    C{keyFile}, else from the protocol's variable (C{OPENAI_API_KEY},
    C{ANTHROPIC_API_KEY}); none is sent if neither is set (Ollama and
    llama.cpp's server need none).
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose openai or anthropic")
    defaults = PROTOCOLS[protocol]
    if systemPrompt is not None and systemPromptFile is not None:
        raise ConfigError("give --system-prompt or --system-prompt-file, not both")
    if systemPromptFile is not None:
        systemPrompt = _readText(systemPromptFile, "system prompt file")
    key: Secret | None = None
    if keyFile is not None:
        key = _readKeyFile(keyFile)
    elif environ.get(defaults["key_env"], "").strip():
        key = Secret(environ[defaults["key_env"]].strip())
    return Provider(
        name=protocol,
        protocol=protocol,
        baseUrl=_checkUrl(baseUrl or defaults["base_url"], "--base-url"),
        model=model,
        key=key,
        systemPrompt=systemPrompt,
        timeout=timeout,
    )


_FIELDS = {
    "protocol", "base_url", "model", "models", "key_env", "key_file",
    "system_prompt", "system_prompt_file", "timeout", "max_tokens",
}


def _provider(name: str, table: Any, environ: Mapping[str, str], where: str) -> Provider:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [providers.{name}] must be a table")
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise ConfigError(
            f"{where}: [providers.{name}] has unknown keys {', '.join(unknown)}"
            f" (known: {', '.join(sorted(_FIELDS))})"
        )

    def text(field: str) -> str | None:
        value = table.get(field)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: providers.{name}.{field} must be a string")
        return value

    protocol = text("protocol") or "openai"
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"{where}: providers.{name}.protocol must be openai or anthropic, not {protocol!r}"
        )
    models = table.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{where}: providers.{name}.models must be a list of strings")
    timeout = table.get("timeout", DEFAULT_TIMEOUT)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ConfigError(f"{where}: providers.{name}.timeout must be a positive number")
    maxTokens = table.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(maxTokens, bool) or not isinstance(maxTokens, int) or maxTokens < 1:
        raise ConfigError(f"{where}: providers.{name}.max_tokens must be a positive integer")
    key: Secret | None = None
    keyFile, keyEnv = text("key_file"), text("key_env")
    if keyFile is not None and keyEnv is not None:
        raise ConfigError(f"{where}: providers.{name}: give key_file or key_env, not both")
    if keyFile is not None:
        key = _readKeyFile(os.path.join(os.path.dirname(where), keyFile))
    elif keyEnv is not None:
        value = environ.get(keyEnv, "").strip()
        if not value:
            raise ConfigError(f"{where}: providers.{name}: ${keyEnv} is not set")
        key = Secret(value)
    prompt, promptFile = text("system_prompt"), text("system_prompt_file")
    if prompt is not None and promptFile is not None:
        raise ConfigError(
            f"{where}: providers.{name}: give system_prompt or system_prompt_file, not both"
        )
    if promptFile is not None:
        prompt = _readText(os.path.join(os.path.dirname(where), promptFile), "system prompt file")
    return Provider(
        name=name,
        protocol=protocol,
        baseUrl=_checkUrl(text("base_url") or PROTOCOLS[protocol]["base_url"], f"{where}: providers.{name}"),
        model=text("model"),
        models=tuple(models),
        key=key,
        systemPrompt=prompt,
        timeout=float(timeout),
        maxTokens=maxTokens,
    )


def loadProviders(
    path: str, environ: Mapping[str, str] = os.environ
) -> tuple[list[Provider], str]:
    """
    The providers of a TOML file, and the name of the default one (its
    C{default} key, else the first provider).  Keys come only from a
    provider's own C{key_file} or C{key_env}: a key is never sent to a
    server it was not configured for.
    """
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the providers file {path!r}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"default", "providers"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(unknown)} (known: default, providers)")
    tables = data.get("providers")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{path}: no [providers.NAME] table")
    providers = [_provider(name, table, environ, path) for name, table in tables.items()]
    default = data.get("default", providers[0].name)
    if default not in tables:
        raise ConfigError(f"{path}: default {default!r} is not one of the providers")
    return providers, default
