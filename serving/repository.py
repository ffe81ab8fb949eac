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
Triton's poller scans), fsynced, and then moved into place with ``rename``, so a polling Triton never
sees a half-written version. The config of a model is replaced (``os.replace``) only when it changes. A
content version already in the repository is not published twice.

Crash safety. One writer at a time: publishing, hiding (rollback, retention) and repair
hold ``repository_lock`` (``flock`` on ``.<repo name>.lock`` beside the repository, with a
timeout). Every rename that publishes or withdraws something is ``durable_rename``: the
files and their directory are fsynced before it, both directories after it. Each operation
is an ordered sequence of steps, and ``repair`` (run at the start of every publish and
hide, and by the trainer at start-up before it publishes anything) brings any intermediate
state back to one complete version served:

- publish: stage + fsync; rename encode_history, score_with_cache, ranking (``_PUBLISH_ORDER``).
  A version counts as published only when all three are in place. Cut short, the staging
  directory and the version's directories in some models are removed (the publish is undone;
  its number is never given again if Triton could have seen it: ``.<repo name>.seen``);
- hide (``hide_versions``): write the intent ``.<repo name>.hiding`` (the versions, fsynced);
  move ranking, then score_with_cache, then encode_history of each version to
  ``<repo>.retired/`` (the exact reverse of a publish, so a hide in progress looks like a
  publish being undone and no Rank answer mixes two models' graphs); remove the intent.
  Cut short, ``repair`` finishes the moves the intent names: a rollback that started always
  completes, it never leaves the withdrawn model on the paths it was being removed from nor
  reverts to it.

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

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
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


# --- Durability and the one writer --------------------------------------------------------------


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (a file: just it), deepest first, then ``root``."""
    root = Path(root)
    if not root.is_dir():
        fsync_file(root)
        return
    for here, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            fsync_file(Path(here) / f)
        fsync_dir(here)


def durable_rename(src: str | Path, dst: str | Path, *, replace: bool = False) -> None:
    """Rename ``src`` (a file or a tree) to ``dst`` so that a power cut keeps it whole.

    ``src``'s contents and its directory are fsynced before the rename, the directories on
    both sides after it.
    """
    src, dst = Path(src), Path(dst)
    fsync_tree(src)
    fsync_dir(src.parent)
    (os.replace if replace else os.rename)(src, dst)
    fsync_dir(dst.parent)
    if src.parent.resolve() != dst.parent.resolve():
        fsync_dir(src.parent)


def write_json_durable(path: str | Path, obj: object) -> None:
    """Write ``path`` by write, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    durable_rename(tmp, path, replace=True)


class RepositoryLocked(RepositoryError):
    """Another process (or thread) holds the repository's writer lock for longer than the timeout."""


LOCK_TIMEOUT_S = 60.0
_held = threading.local()  # lock path -> depth: the lock is re-entrant within one thread


def _beside(repo: str | Path, suffix: str) -> Path:
    """``<repo's parent>/.<repo name><suffix>``: beside the repository, outside what Triton scans."""
    repo = Path(repo).resolve()
    return repo.parent / f".{repo.name}{suffix}"


@contextlib.contextmanager
def repository_lock(repo: str | Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the repository's writer lock (``flock`` on ``.<repo>.lock`` beside it) for the body.

    Every publish, hide (rollback, retention, a version Triton did not serve) and repair
    takes it, so a ``hisam trainer rollback`` never races a background publish. Re-entrant
    within a thread; between threads and processes it waits up to ``timeout_s``, then
    raises ``RepositoryLocked`` naming the holder.
    """
    path = _beside(repo, ".lock")
    depth = getattr(_held, "depth", {})
    _held.depth = depth
    if depth.get(path):
        depth[path] += 1
        try:
            yield
        finally:
            depth[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    raise RepositoryLocked(
                        f"the model repository {Path(repo)} is locked by another publish or rollback "
                        f"({holder}) for over {timeout_s:.0f}s; try again when it has finished"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        depth[path] = 1
        try:
            yield
        finally:
            depth.pop(path, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


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
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> PublishedVersion:
    """Publish a model as a new version of the three Triton models of ``repo`` (module docstring).

    ``source``: an ``HMAT`` (exported here), a training checkpoint directory, a directory
    with ``ranking.onnx``, ``encode_history.onnx`` and ``score_with_cache.onnx`` (export/graphs.py's
    ``export_all``), or a mapping graph -> ModelProto or path. ``version``: Triton's integer
    version (default: one more than the newest). ``instances``: model instances per model;
    ``threads``: ONNX Runtime intra-op threads per instance (CPU target). ``fault_point``:
    tests only, where to die (``FaultPoint``). Holds the writer lock (``repository_lock``).
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
    with repository_lock(repo, lock_timeout_s):
        seen = repair(repo)
        existing = published_versions(repo)
        for n, v in existing.items():
            if v == content and version in (None, n):
                log.info("%s is already published as version %d in %s", content, n, repo)
                return PublishedVersion(repo, n, content, tokenizer, created=False)
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
            fsync_tree(staging)
            _fault_point("staged", fault_point)
            for k, (_, name) in enumerate(_PUBLISH_ORDER):
                _move_into_place(staging / name, repo / name, str(n))
                _fault_point(("first_moved", "second_moved", "moved")[k], fault_point)  # type: ignore[arg-type]
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("published %s as version %d of %s (%s target)", content, n, repo, target)
    return PublishedVersion(repo, n, content, tokenizer, created=True)


# The cached Rank path's two graphs go first and the full-path graph last: while a publish is
# between its renames, encode_history and score_with_cache may differ in version (Rank then
# falls back to the full ranking graph, still the old version) or both be new (the new model,
# complete for that path); no answer mixes two models' graphs. A version is complete (counts
# as published) only once the last of them is in place.
_PUBLISH_ORDER = [(g, GRAPH_MODELS[g]) for g in ("encode_history", "score_with_cache", "ranking")]
# Hiding is the exact reverse (module docstring, "Crash safety").
_HIDE_ORDER = [name for _, name in reversed(_PUBLISH_ORDER)]

# Fault injection (the reliability tests): the process exits abruptly (os._exit, like SIGKILL)
# at that step. A publish: "staged" (staging written and fsynced, nothing renamed),
# "first_moved" / "second_moved" / "moved" (after the first, second, third rename). A hide:
# "hide_intent" (the intent written, nothing moved), "hide_first_moved" / "hide_second_moved",
# "hidden" (all moved, the intent not yet cleared). A job takes the point from the environment
# variable FAULT_ENV (hisam/jobs/trainer_run.py); nothing here reads it.
FaultPoint = Literal[
    "staged",
    "first_moved",
    "second_moved",
    "moved",
    "hide_intent",
    "hide_first_moved",
    "hide_second_moved",
    "hidden",
]
FAULT_ENV = "HISAM_FAULT_EXIT_IN_PUBLISH"


def _fault_point(name: FaultPoint, armed: str | None) -> None:
    if armed == name:
        log.critical("fault injection: exiting in the middle of a publish or rollback (%s)", name)
        logging.shutdown()
        os._exit(137)


def _staging_prefix(repo: Path) -> str:
    return f".{repo.resolve().name}.staging-"


def retired_root(repo: str | Path) -> Path:
    """Where hidden versions go: ``<repo>.retired/<model>/<n>-<time>-<pid>`` (same file system)."""
    repo = Path(repo).resolve()
    return repo.with_name(repo.name + ".retired")


def _move_out(repo: Path, name: str, version: int) -> Path | None:
    src = repo / name / str(version)
    if not src.exists():
        return None
    dest = retired_root(repo) / name / f"{version}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    durable_rename(src, dest)
    return dest


def hide_versions(
    repo: str | Path,
    versions: list[int],
    *,
    fault_point: FaultPoint | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> list[Path]:
    """Move ``versions`` (in this order) out of ``repo`` (module docstring, "Crash safety"); returns where to.

    Under the writer lock: the intent (``.<repo>.hiding``, the versions) is written durably
    first, then each version's model directories are moved ranking, score_with_cache,
    encode_history, then the intent is removed. A crash in between is completed by ``repair``.
    """
    repo = Path(repo)
    moved: list[Path] = []
    with repository_lock(repo, lock_timeout_s):
        repair(repo)
        intent = _beside(repo, ".hiding")
        write_json_durable(intent, {"versions": [int(v) for v in versions], "pid": os.getpid()})
        _fault_point("hide_intent", fault_point)
        for v in versions:
            for k, name in enumerate(_HIDE_ORDER):
                dest = _move_out(repo, name, v)
                if dest is not None:
                    moved.append(dest)
                if k < 2:
                    _fault_point(("hide_first_moved", "hide_second_moved")[k], fault_point)  # type: ignore[arg-type]
        _fault_point("hidden", fault_point)
        intent.unlink()
        fsync_dir(intent.parent)
    log.info("hid version(s) %s of %s (%d model dirs)", versions, repo, len(moved))
    return moved


def repair(repo: str | Path) -> set[int]:
    """Complete or undo what an interrupted publish or hide left; returns the numbers Triton may have seen.

    Under the writer lock. A hide's intent is completed first: the versions it names are
    moved out of every model that still has them (a rollback cut short finishes, it is
    never reverted). Then any staging directory beside the repository is a dead publish's,
    and a version present in some models but not all is one whose renames were cut short:
    both are removed (Triton's poller then unloads such a version and goes back to the
    newest complete one). The numbers of such versions are kept (``.<repo>.seen``) and
    returned with every number present, so that a later version takes a number no Triton
    has loaded before.
    """
    repo = Path(repo)
    with repository_lock(repo):
        intent = _beside(repo, ".hiding")
        if intent.is_file():
            try:
                pending = [int(v) for v in json.loads(intent.read_text())["versions"]]
            except (ValueError, KeyError, TypeError) as e:
                raise RepositoryError(f"{intent} is unreadable ({e}): finish the rollback it names by hand") from e
            for v in pending:
                for name in _HIDE_ORDER:
                    if _move_out(repo, name, v) is not None:
                        log.warning("completed the interrupted hide of version %d of %s (%s)", v, repo, name)
            intent.unlink()
            fsync_dir(intent.parent)
        for stale in repo.resolve().parent.glob(_staging_prefix(repo) + "*"):
            log.warning("removing %s, left by an interrupted publish", stale)
            shutil.rmtree(stale, ignore_errors=True)  # its numbers were never renamed where Triton looks
        seen_file = _beside(repo, ".seen")
        kept: set[int] = set(json.loads(seen_file.read_text())) if seen_file.is_file() else set()
        complete = set(published_versions(repo))
        present = {
            (name, int(d.name))
            for name in GRAPH_MODELS.values()
            if (repo / name).is_dir()
            for d in (repo / name).iterdir()
            if d.name.isdigit()
        }
        partial = {(name, n) for name, n in present if n not in complete}
        if {n for _, n in partial} - kept:
            kept |= {n for _, n in partial}
            write_json_durable(seen_file, sorted(kept))  # before the removal: a crash in it forgets nothing
        for name, n in sorted(partial):
            log.warning(
                "removing %s: a version the other models do not have (interrupted publish)", repo / name / str(n)
            )
            shutil.rmtree(repo / name / str(n), ignore_errors=True)
            fsync_dir(repo / name)
        return kept | {n for _, n in present}


def _move_into_place(staged: Path, final: Path, version: str) -> None:
    """Rename a staged model dir (config + one version) into ``final`` without partial states."""
    if not final.exists():
        durable_rename(staged, final)  # a new model appears whole
        return
    if (final / version).exists():
        raise RepositoryError(f"{final / version} already exists; pass another version")
    new_cfg = (staged / "config.pbtxt").read_text()
    cfg = final / "config.pbtxt"
    if not cfg.is_file() or cfg.read_text() != new_cfg:
        durable_rename(staged / "config.pbtxt", cfg, replace=True)
    durable_rename(staged / version, final / version)
