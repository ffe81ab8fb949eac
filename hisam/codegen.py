"""Generate Python code from the .proto files under proto/ (never hand-edited, never committed).

The files live at proto/hisam/pb/v1/*.proto with proto package ``hisam.pb.v1``, so the
generated modules land in ``hisam/pb/v1/`` and import each other as ``hisam.pb.v1.*``.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Compile every proto under proto/ into ``out_root``; return the .proto files compiled."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency; only the codegen step needs it

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        return []
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} on {len(protos)} files")
    for p in protos:
        pkg_dir = out_root / p.parent.relative_to(PROTO_ROOT)
        (pkg_dir / "__init__.py").touch()
    log.info("generated code for %d proto files", len(protos))
    return protos
