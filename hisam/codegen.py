"""Generate Python code from the .proto files under proto/ (never hand-edited, never committed).

The files live at proto/hisam_pb/v1/*.proto, so the generated modules land in the top-level
package ``hisam_pb/v1/`` and import each other as ``hisam_pb.v1.*``. The proto package (the
wire names, e.g. ``hisam.pb.v1.RankingService``) stays ``hisam.pb.v1``; the Python package is
named apart from the application package ``hisam`` so that the layers below it (features,
stream, serving) can import the messages without importing the application
(docs/design.md, "Layout").
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
        rel = p.parent.relative_to(PROTO_ROOT)
        for depth in range(1, len(rel.parts) + 1):  # hisam_pb/ and hisam_pb/v1/ are packages
            (out_root.joinpath(*rel.parts[:depth]) / "__init__.py").touch()
    log.info("generated code for %d proto files", len(protos))
    return protos
