"""
chatweb's public names: what C{from chatweb import *} and each subpackage
give, pinned so that a change to the public API is a deliberate one; and
every module imports on its own (no import cycles).
"""

from __future__ import annotations

import ast
import glob
import os
import pkgutil
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import chatweb
import chatweb.client
import chatweb.backends
import chatweb.model
import chatweb.queue
import chatweb.render
import chatweb.store
import chatweb.testing
import chatweb.web

EXPORTS = {
    chatweb: [
        "ChatWebService",
        "Delivery",
        "Event",
        "EventHub",
        "EventKind",
        "IJournal",
        "IResponder",
        "ISessionAdapter",
        "Message",
        "MessageQueue",
        "QueuedMessage",
        "RetryPolicy",
        "Session",
        "SessionView",
        "Sessions",
        "Usage",
    ],
    chatweb.model: [
        "CancelReason",
        "DELIVERED",
        "DELIVERING",
        "DISCARDED",
        "Delivery",
        "Event",
        "EventKind",
        "FAILED",
        "Message",
        "MessageState",
        "PENDING",
        "QueuedMessage",
        "ROLES",
        "Session",
        "SessionPage",
        "Usage",
    ],
    chatweb.backends: [
        "ModelError",
        "ModelResponder",
        "Provider",
        "Stopped",
        "loadProviders",
        "providerFromOptions",
    ],
    chatweb.queue: ["MessageQueue", "RetryPolicy", "describeFailure"],
    chatweb.store: [
        "DatabaseClosed",
        "JOURNAL_SCHEMA",
        "MemoryJournal",
        "PostgreSQLDatabase",
        "SQLiteDatabase",
        "SQLiteJournal",
    ],
    chatweb.render: [
        "SECURITY_HEADERS",
        "highlightCode",
        "plainText",
        "renderIndex",
        "renderMarkdown",
        "renderSession",
        "renderSessionInline",
    ],
    chatweb.web: [
        "ChatWebAPI",
        "ChatWebSite",
        "checkAPIKeys",
        "describeAddress",
        "normalizeAllowedHost",
    ],
    chatweb.testing: [
        "ChatWebProcess",
        "InMemoryChatWeb",
        "MemoryAdapter",
        "MemoryJournal",
        "RunningChatWeb",
        "chatWebInMemory",
        "startChatWeb",
        "twistdCommand",
    ],
    chatweb.client: [
        "Answer",
        "BadRequest",
        "ChatWebClient",
        "ChatWebError",
        "Conflict",
        "EventStream",
        "HTTPError",
        "MessageStatus",
        "NotFound",
        "Sent",
        "SessionDetail",
        "ShareLink",
        "StreamEvent",
        "Throttled",
        "Unauthorized",
        "Unavailable",
        "UnknownMessage",
        "UnknownSession",
        "Unreachable",
    ],
}


def allModules() -> list[str]:
    """
    The names of every module of the chatweb package.
    """
    names = ["chatweb"]
    for info in pkgutil.walk_packages(chatweb.__path__, "chatweb."):
        names.append(info.name)
    return sorted(names)


def moduleImports(name: str, root: str) -> set[str]:
    """
    The chatweb modules that module C{name} imports when it loads, with the
    subpackages they are in (but not the packages C{name} is in, which are
    loading already when it loads).
    """
    path = os.path.join(root, *name.split("."))
    isPackage = os.path.isdir(path)
    if isPackage:
        path = os.path.join(path, "__init__")
    with open(path + ".py", encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    modules = set(allModules())
    result: set[str] = set()
    for target in imported:
        parts = target.split(".")
        for end in range(2, len(parts) + 1):
            candidate = ".".join(parts[:end])
            # A module's own packages are loading already when it loads.
            if candidate in modules and not (name + ".").startswith(candidate + "."):
                result.add(candidate)
    return result


class ExportsTests(SynchronousTestCase):
    def test_all(self) -> None:
        """
        Each package's C{__all__} is exactly the pinned list, and every name
        in it is there.
        """
        for module, expected in EXPORTS.items():
            self.assertEqual(sorted(module.__all__), sorted(expected), module.__name__)
            for name in expected:
                self.assertTrue(hasattr(module, name), f"{module.__name__}.{name}")

    def test_renderImportsNoTwisted(self) -> None:
        """
        chatweb.render is pure, session in and HTML out: none of its modules
        imports Twisted.
        """
        for path in glob.glob(os.path.join(os.path.dirname(chatweb.render.__file__), "*.py")):
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    self.assertFalse(
                        name == "twisted" or name.startswith("twisted."),
                        f"{path} imports {name}",
                    )

    def test_noImportCycles(self) -> None:
        """
        The imports that run when a module loads (not those inside
        functions) make no cycle among chatweb's modules, counting a
        subpackage's C{__init__} as imported with any of its modules.
        """
        root = os.path.dirname(os.path.dirname(chatweb.__file__))
        graph = {name: moduleImports(name, root) for name in allModules()}
        cycles = []
        done: set[str] = set()

        def visit(name: str, path: list[str]) -> None:
            if name in path:
                cycles.append(path[path.index(name) :] + [name])
                return
            if name in done:
                return
            for target in graph.get(name, ()):
                visit(target, path + [name])
            done.add(name)

        for name in graph:
            visit(name, [])
        self.assertEqual(cycles, [])

    def test_eachModuleImportsAlone(self) -> None:
        """
        Every chatweb module imports in a fresh interpreter without error.
        (Cycles are caught by the static import-graph test: the package's
        own __init__ imports its modules in one fixed order, so a cycle
        does not fail here.)
        """
        modules = allModules()
        self.assertIn("chatweb.web._api", modules)
        script = (
            "import importlib, sys\n"
            "failed = []\n"
            "for name in sys.argv[1:]:\n"
            "    for loaded in [m for m in sys.modules if m == 'chatweb' or m.startswith('chatweb.')]:\n"
            "        del sys.modules[loaded]\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as e:\n"
            "        failed.append(f'{name}: {e!r}')\n"
            "print('\\n'.join(failed))\n"
            "sys.exit(1 if failed else 0)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, *modules], capture_output=True, text=True
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
