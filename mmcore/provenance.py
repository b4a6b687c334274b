"""Code versions and environment facts recorded with every artifact."""

from __future__ import annotations

import ast
import functools
import platform
import sys
from importlib import metadata
from pathlib import Path

from mmcore.tables import text_digest

_PACKAGE = "mmcore"
_ALWAYS = ("mmcore.tables", "mmcore.base")


_ROOT = Path(__file__).resolve().parent


def _source(module: str) -> Path | None:
    """The file of an mmcore module (``None`` for names that are not modules, e.g. classes)."""
    rel = module.split(".", 1)[1] if "." in module else "__init__"
    for cand in (_ROOT / f"{rel.replace('.', '/')}.py", _ROOT / rel.replace(".", "/") / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def runtime_nodes(tree: ast.AST):
    """``ast.walk`` without the bodies of ``if TYPE_CHECKING:`` blocks (imports for type hints only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _mmcore_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == _PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == _PACKAGE:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from mmcore import x`
    return found


@functools.cache
def code_digest(module: str) -> str:
    """Digest of a module's source and of every mmcore module it imports, transitively.

    A stage's cache key includes this, so editing the stage's code (or a helper it uses) re-runs
    the stage, while editing an unrelated module does not.
    """
    seen: dict[str, Path] = {}
    todo = [module, *_ALWAYS]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _source(name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_mmcore_imports(path))
    return text_digest(*(f"{name}\n{seen[name].read_text()}" for name in sorted(seen)))


def versions() -> dict[str, str]:
    """Python, platform and the versions of the packages results depend on."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("mmpipe", "prefect", "torch", "torchvision", "transformers", "tokenizers", "pandas", "pyarrow",
                "numpy", "scikit-learn", "pillow", "opencv-python-headless", "simplejpeg", "imagehash", "ftfy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


PATH_MARK = "<path: content in the extra digest>"


def settings_json(model) -> str:
    """A config section as JSON for cache keys and ``config_digest``, with every path field replaced
    by a mark: where a file sits is no setting. What a path points at is keyed by content instead
    (the manifest's digest, the stage's ``extra``: model folders, the image files), so a stage
    computed on one machine or in one checkout is a cache hit in another with the same files."""
    from pathlib import PurePath

    from pydantic import BaseModel

    def walk(node):
        if isinstance(node, BaseModel):
            return {k: walk(getattr(node, k)) for k in type(node).model_fields}
        if isinstance(node, PurePath):
            return PATH_MARK
        if isinstance(node, dict):
            return {str(k): walk(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v) for v in node]
        return node

    import json

    return json.dumps(walk(model), sort_keys=True, default=str)


def settings_digest(model) -> str:
    """The digest of ``settings_json``: a stage's ``config_digest`` (its stats, ``inspect --stale``)."""
    return text_digest(settings_json(model))
