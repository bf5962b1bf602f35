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
    roots: set[Path] = set()
    in_place = True  # every file lies under its root by its manifest name
    for filename, path in paths.items():
        root = path
        for _ in PurePosixPath(filename).parts:
            root = root.parent
        in_place = in_place and root / filename == path
        roots.add(root)
    if in_place and len(roots) == 1:
        return roots.pop()
    links = Path(tempfile.mkdtemp(prefix=f"llmlb-{model_id.replace('/', '-')}-"))
    for filename, path in paths.items():
        link = links / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return links
