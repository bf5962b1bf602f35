"""The one folder a Hugging Face-layout model (``config.json``, weights, tokenizer) is read from.

``transformers`` and vLLM read a model from a folder, while a node may find one model's files in
different places (some in its models dir, some in the shared dir). When every file already lies under
one folder by its manifest name, that folder is used; otherwise a private folder of symbolic links,
one per manifest name, stands in for it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath


def model_folder(paths: Mapping[str, Path], model_id: str) -> Path:
    """The folder holding every manifest file of ``paths`` (filename -> path) under its own name."""
    roots = set()
    for filename, path in paths.items():
        depth = len(PurePosixPath(filename).parts)
        root = path
        for _ in range(depth):
            root = root.parent
        if root / filename != path:
            roots.add(None)
        roots.add(root)
    if len(roots) == 1 and None not in roots:
        return next(iter(roots))  # type: ignore[return-value]
    links = Path(tempfile.mkdtemp(prefix=f"llmlb-{model_id.replace('/', '-')}-"))
    for filename, path in paths.items():
        link = links / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return links
