"""The Triton model repository: versioned HMAT models with explicit ``config.pbtxt`` files.

Layout (Triton's standard repository; one Triton model per serving graph of
``export.graphs``)::

    <repo>/hmat_ranking/config.pbtxt            full one-pass ranking (stream + anchor index -> scores)
    <repo>/hmat_ranking/<n>/model.onnx
    <repo>/hmat_ranking/<n>/model.py            CPU target only: the Python backend running ONNX Runtime
    <repo>/hmat_encode_history/...              history stream -> compact anchor KV cache
    <repo>/hmat_score_with_cache/...            cache + candidate codes -> scores

``<n>`` is Triton's integer version, one more than the newest already there; one
``publish_version`` writes the same ``<n>`` for the three models. The content version
(``hmat-<hash>``, export/graphs.py's ``model_version``) is stamped into every graph as an extra
string output ``model_version``, so each response names the model that computed it. That
is how the Rank server notices a version roll between ``encode_history`` and
``score_with_cache`` (Triton loads the three models independently) and keeps its anchor
cache per content version.

Publishing is atomic per model: everything is written under ``<repo's parent>/.<repo
name>.staging-*`` first (beside the repository, on the same file system, outside what
Triton's poller scans) and then moved into place with ``rename``, so a polling Triton never
sees a half-written version. The config of a model is replaced (``os.replace``) only when it changes. A
content version already in the repository is not published twice.

Two targets, chosen per repository:

- ``cpu`` (the embedded default): ``backend: "python"`` running ONNX Runtime (model.py is
  ``serving/triton_model.py``). The Triton on PyPI has no ONNX Runtime backend, so this is
  the only way to run these graphs in a real Triton here.
- ``gpu`` (deployment): ``platform: "onnxruntime_onnx"`` on ``KIND_GPU`` with ONNX Runtime's
  TensorRT execution provider as accelerator. ONNX Runtime inlines the
  ``hisam.AnchorAttention`` function body when it loads the graph, so TensorRT sees
  standard ops (route 1 of export/graphs.py's "TensorRT route"); subgraphs TensorRT rejects stay
  on the CUDA provider. FP16 is off by default: the parity tolerances in the tests are for
  fp32. Needs Triton's container; here these files are only validated (tests/serving).

Inputs and outputs of every config come from the ONNX graph itself (names, dtypes, dynamic
dims as -1), so a config cannot drift from its model. ``max_batch_size`` is 0: the batch
dimension is explicit, because the stream length S differs between requests and Triton's
dynamic batcher only concatenates equal shapes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

log = logging.getLogger(__name__)

Target = Literal["cpu", "gpu"]
GRAPH_MODELS: dict[str, str] = {
    "ranking": "hmat_ranking",
    "encode_history": "hmat_encode_history",
    "score_with_cache": "hmat_score_with_cache",
}
VERSION_OUTPUT = "model_version"
MODEL_FILE = "model.onnx"
PYTHON_MODEL = Path(__file__).with_name("triton_model.py")

_ONNX_TO_TRITON = {
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.INT32: mc.TYPE_INT32,
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.BOOL: mc.TYPE_BOOL,
    onnx.TensorProto.STRING: mc.TYPE_STRING,
}


class RepositoryError(RuntimeError):
    """A model repository or a model source is not what publishing expects."""


@dataclass(frozen=True)
class PublishedVersion:
    """What ``publish_version`` wrote (or found already published)."""

    repo: Path
    version: int  # Triton's integer version
    model_version: str  # content version, hmat-<hash>
    tokenizer_version: str
    created: bool  # False: this content version was already in the repository

    def model_dir(self, graph: str) -> Path:
        return self.repo / GRAPH_MODELS[graph] / str(self.version)


# --- Graph preparation ------------------------------------------------------------------------


def metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def with_version_output(proto: onnx.ModelProto, version: str) -> onnx.ModelProto:
    """A copy of ``proto`` with a constant string output ``model_version`` (1,) = ``version``."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    if any(o.name == VERSION_OUTPUT for o in out.graph.output):
        return out
    value = onnx.helper.make_tensor(VERSION_OUTPUT + "_value", onnx.TensorProto.STRING, [1], [version.encode()])
    out.graph.node.append(onnx.helper.make_node("Constant", [], [VERSION_OUTPUT], value=value))
    out.graph.output.append(onnx.helper.make_tensor_value_info(VERSION_OUTPUT, onnx.TensorProto.STRING, [1]))
    return out


def _load_graphs(source: object) -> dict[str, onnx.ModelProto]:
    """Graph name -> ModelProto from an HMAT model, a checkpoint dir, an export dir or a mapping."""
    if isinstance(source, Mapping):
        return {
            g: source[g] if isinstance(source[g], onnx.ModelProto) else onnx.load(str(source[g])) for g in GRAPH_MODELS
        }
    if isinstance(source, (str, Path)):
        src = Path(source)
        if all((src / f"{g}.onnx").is_file() for g in GRAPH_MODELS):
            return {g: onnx.load(str(src / f"{g}.onnx")) for g in GRAPH_MODELS}
        if (src / "config.json").is_file():
            from export.graphs import export_checkpoint

            with tempfile.TemporaryDirectory(prefix="hisam-export-") as tmp:
                paths = export_checkpoint(src, tmp)
                return {g: onnx.load(str(paths[g])) for g in GRAPH_MODELS}
        raise RepositoryError(
            f"{src} holds neither the exported graphs ({', '.join(GRAPH_MODELS)}).onnx nor a checkpoint"
        )
    from models.hmat.model import HMAT

    if isinstance(source, HMAT):
        from export.graphs import export_graph

        return {g: export_graph(source.eval(), g, tokenizer_version=None) for g in GRAPH_MODELS}
    raise RepositoryError(f"cannot publish a {type(source).__name__}: pass an HMAT, a checkpoint or an export dir")


# --- config.pbtxt -------------------------------------------------------------------------------


def _tensor_configs(values, kind: type) -> list:
    out = []
    for v in values:
        t = v.type.tensor_type
        if t.elem_type not in _ONNX_TO_TRITON:
            raise RepositoryError(f"tensor {v.name!r}: ONNX element type {t.elem_type} has no Triton type here")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        out.append(kind(name=v.name, data_type=_ONNX_TO_TRITON[t.elem_type], dims=dims))
    return out


def model_config(
    name: str, proto: onnx.ModelProto, target: Target, instances: int = 1, threads: int = 1
) -> mc.ModelConfig:
    """The Triton config of one model; inputs and outputs are read from ``proto``."""
    cfg = mc.ModelConfig(
        name=name,
        max_batch_size=0,
        input=_tensor_configs(proto.graph.input, mc.ModelInput),
        output=_tensor_configs(proto.graph.output, mc.ModelOutput),
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
    )
    if target == "cpu":
        cfg.backend = "python"
        cfg.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances))
        cfg.parameters["intra_op_threads"].string_value = str(threads)
    elif target == "gpu":
        cfg.platform = "onnxruntime_onnx"
        cfg.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_GPU, count=instances))
        trt = mc.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator(name="tensorrt")
        trt.parameters["precision_mode"] = "FP32"
        trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
        trt.parameters["trt_engine_cache_enable"] = "1"
        cfg.optimization.execution_accelerators.gpu_execution_accelerator.append(trt)
    else:
        raise ValueError(f"target must be 'cpu' or 'gpu', got {target!r}")
    return cfg


def config_text(cfg: mc.ModelConfig) -> str:
    return (
        "# Generated by serving/repository.py from the model's ONNX graph; do not edit.\n"
        + text_format.MessageToString(cfg)
    )


def read_config(path: str | Path) -> mc.ModelConfig:
    """Parse a config.pbtxt against Triton's ModelConfig schema (raises on unknown fields or enums)."""
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


# --- Publishing ---------------------------------------------------------------------------------


def published_versions(repo: str | Path) -> dict[int, str]:
    """Triton version -> content version of the versions present for every model of the repository."""
    repo = Path(repo)
    found: dict[int, str] = {}
    first = repo / GRAPH_MODELS["ranking"]
    if not first.is_dir():
        return found
    for d in first.iterdir():
        if d.name.isdigit() and all((repo / m / d.name / MODEL_FILE).is_file() for m in GRAPH_MODELS.values()):
            marker = d / "MODEL_VERSION"
            found[int(d.name)] = marker.read_text().strip() if marker.is_file() else ""
    return found


def publish_version(
    repo: str | Path,
    source: object,
    version: int | None = None,
    *,
    target: Target = "cpu",
    instances: int = 1,
    threads: int = 1,
    fault_point: FaultPoint | None = None,
) -> PublishedVersion:
    """Publish a model as a new version of the three Triton models of ``repo`` (module docstring).

    ``source``: an ``HMAT`` (exported here), a training checkpoint directory, a directory
    with ``ranking.onnx``, ``encode_history.onnx`` and ``score_with_cache.onnx`` (export/graphs.py's
    ``export_all``), or a mapping graph -> ModelProto or path. ``version``: Triton's integer
    version (default: one more than the newest). ``instances``: model instances per model;
    ``threads``: ONNX Runtime intra-op threads per instance (CPU target). ``fault_point``:
    tests only, where to die (``FaultPoint``).
    """
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    graphs = _load_graphs(source)
    versions = {metadata(p).get("model_version", "") for p in graphs.values()}
    if len(versions) != 1 or not next(iter(versions)):
        raise RepositoryError(
            f"the three graphs must carry one model_version in their metadata, got {sorted(versions)}"
        )
    content = versions.pop()
    tokenizer = metadata(graphs["ranking"]).get("tokenizer_version", "")
    for n, v in published_versions(repo).items():
        if v == content and version in (None, n):
            log.info("%s is already published as version %d in %s", content, n, repo)
            return PublishedVersion(repo, n, content, tokenizer, created=False)
    seen = repair(repo)
    existing = published_versions(repo)
    # Never reuse a number Triton may have seen (an interrupted publish's, repaired away).
    n = version if version is not None else max([*existing, *seen], default=0) + 1
    if n < 1:
        raise ValueError(f"Triton versions start at 1, got {n}")

    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(repo), dir=repo.resolve().parent))
    try:
        for graph, name in _PUBLISH_ORDER:
            proto = with_version_output(graphs[graph], content)
            mdir = staging / name
            vdir = mdir / str(n)
            vdir.mkdir(parents=True)
            onnx.save(proto, str(vdir / MODEL_FILE))
            if target == "cpu":
                shutil.copyfile(PYTHON_MODEL, vdir / "model.py")
            (vdir / "MODEL_VERSION").write_text(content + "\n")
            (mdir / "config.pbtxt").write_text(config_text(model_config(name, proto, target, instances, threads)))
        _fault_point("staged", fault_point)
        for k, (_, name) in enumerate(_PUBLISH_ORDER):
            _move_into_place(staging / name, repo / name, str(n))
            if k == 0:
                _fault_point("first_moved", fault_point)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("published %s as version %d of %s (%s target)", content, n, repo, target)
    return PublishedVersion(repo, n, content, tokenizer, created=True)


# The cached Rank path's two graphs go first and the full-path graph last: while a publish is
# between its renames, encode_history and score_with_cache may differ in version (Rank then
# falls back to the full ranking graph, still the old version) or both be new (the new model,
# complete for that path); no answer mixes two models' graphs.
_PUBLISH_ORDER = [(g, GRAPH_MODELS[g]) for g in ("encode_history", "score_with_cache", "ranking")]

# Fault injection (the reliability tests): with ``fault_point="staged"`` the publishing process
# exits abruptly (os._exit, like SIGKILL) after the staging directory is written and before any
# rename; with "first_moved", right after the first model's version is renamed into place. A
# job that publishes takes the point from the environment variable FAULT_ENV
# (hisam/jobs/trainer_run.py); nothing here reads it.
FaultPoint = Literal["staged", "first_moved"]
FAULT_ENV = "HISAM_FAULT_EXIT_IN_PUBLISH"


def _fault_point(name: FaultPoint, armed: FaultPoint | None) -> None:
    if armed == name:
        log.critical("fault injection: exiting in the middle of a publish (%s)", name)
        logging.shutdown()
        os._exit(137)


def _staging_prefix(repo: Path) -> str:
    return f".{repo.resolve().name}.staging-"


def repair(repo: str | Path) -> set[int]:
    """Undo what an interrupted publish left; returns every version number found in any model.

    One writer publishes into a repository (the trainer; ``hisam serve`` only before it
    starts), so at the start of a publish any staging directory beside the repository is a
    dead publish's, and a version present in some models but not all is one whose renames
    were cut short: both are removed (Triton's poller then unloads such a version and goes
    back to the newest complete one). The numbers are returned so that the next version
    takes a number no Triton has loaded before.
    """
    repo = Path(repo)
    for stale in repo.resolve().parent.glob(_staging_prefix(repo) + "*"):
        log.warning("removing %s, left by an interrupted publish", stale)
        shutil.rmtree(stale, ignore_errors=True)
    seen: set[int] = set()
    complete = set(published_versions(repo))
    for name in GRAPH_MODELS.values():
        mdir = repo / name
        if not mdir.is_dir():
            continue
        for d in mdir.iterdir():
            if d.name.isdigit():
                seen.add(int(d.name))
                if int(d.name) not in complete:
                    log.warning("removing %s: a version the other models do not have (interrupted publish)", d)
                    shutil.rmtree(d, ignore_errors=True)
    return seen


def _move_into_place(staged: Path, final: Path, version: str) -> None:
    """Rename a staged model dir (config + one version) into ``final`` without partial states."""
    if not final.exists():
        os.rename(staged, final)  # a new model appears whole
        return
    if (final / version).exists():
        raise RepositoryError(f"{final / version} already exists; pass another version")
    new_cfg = (staged / "config.pbtxt").read_text()
    cfg = final / "config.pbtxt"
    if not cfg.is_file() or cfg.read_text() != new_cfg:
        os.replace(staged / "config.pbtxt", cfg)
    os.rename(staged / version, final / version)
