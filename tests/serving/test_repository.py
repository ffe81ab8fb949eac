"""The Triton model repository (serving/repository.py): layout, atomic versioned publishing, configs.

Configs are parsed back with Triton's own ModelConfig schema (tritonclient's
model_config_pb2): an unknown field, enum or type fails the parse, as it would fail
Triton's loader. The GPU configs cannot run here (no Triton container, no GPU); these
checks are what validates them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from serving import repository as repo_mod
from serving.repository import GRAPH_MODELS, VERSION_OUTPUT, publish_version, published_versions, read_config

_TRITON_TYPES = {
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.STRING: mc.TYPE_STRING,
}


def _check_config_matches_graph(cfg: mc.ModelConfig, proto: onnx.ModelProto) -> None:
    for declared, values in ((cfg.input, proto.graph.input), (cfg.output, proto.graph.output)):
        assert [t.name for t in declared] == [v.name for v in values]
        for t, v in zip(declared, values, strict=True):
            tt = v.type.tensor_type
            assert t.data_type == _TRITON_TYPES[tt.elem_type], t.name
            assert list(t.dims) == [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim], t.name
    assert cfg.max_batch_size == 0 and cfg.version_policy.latest.num_versions == 1


def test_publish_writes_versioned_models_with_explicit_configs(tiny_export, tmp_path) -> None:
    pv = publish_version(tmp_path, tiny_export.graphs)
    assert pv.created and pv.version == 1 and pv.model_version.startswith("hmat-")
    for graph, name in GRAPH_MODELS.items():
        mdir = tmp_path / name
        assert sorted(p.name for p in (mdir / "1").iterdir()) == ["MODEL_VERSION", "model.onnx", "model.py"]
        cfg = read_config(mdir / "config.pbtxt")
        assert cfg.name == name and cfg.backend == "python" and not cfg.platform
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        proto = onnx.load(str(mdir / "1" / "model.onnx"))
        _check_config_matches_graph(cfg, proto)
        assert cfg.output[-1].name == VERSION_OUTPUT
        assert {m.key: m.value for m in proto.metadata_props}["graph"] == graph
    # Staging happens beside the repository (never inside it, where Triton polls) and is removed.
    assert not [p for p in tmp_path.rglob("*staging*")]
    assert not [p for p in tmp_path.parent.iterdir() if ".staging-" in p.name]


def test_publish_is_idempotent_per_content_version_and_counts_up(tiny_export, tmp_path, restamp) -> None:
    first = publish_version(tmp_path, tiny_export.graphs)
    again = publish_version(tmp_path, tiny_export.graphs)
    assert not again.created and again.version == first.version
    second = publish_version(tmp_path, restamp(tiny_export.graphs, model_version="hmat-second"))
    assert second.created and second.version == 2
    assert published_versions(tmp_path) == {1: first.model_version, 2: "hmat-second"}
    with pytest.raises(repo_mod.RepositoryError, match="already exists"):
        publish_version(tmp_path, restamp(tiny_export.graphs, model_version="hmat-third"), version=2)
    assert published_versions(tmp_path) == {1: first.model_version, 2: "hmat-second"}  # nothing half-written


def test_publish_refuses_graphs_of_different_models(tiny_export, tmp_path, restamp) -> None:
    graphs = dict(tiny_export.graphs)
    graphs["ranking"] = restamp({"ranking": graphs["ranking"]}, model_version="hmat-other")["ranking"]
    with pytest.raises(repo_mod.RepositoryError, match="one model_version"):
        publish_version(tmp_path, graphs)
    assert published_versions(tmp_path) == {}


def test_version_output_is_returned_by_onnx_runtime(tiny_export) -> None:
    proto = repo_mod.with_version_output(tiny_export.graphs["ranking"], "hmat-abc")
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    from export.graphs import _example_stream, ranking_feed

    feed = ranking_feed(_example_stream(tiny_export.model), tiny_export.model.config.rope)
    scores, version = sess.run(["scores", VERSION_OUTPUT], feed)
    assert version.tolist() == ["hmat-abc"] and np.isfinite(scores).all()


def test_gpu_deployment_configs_are_valid_triton_configs(tiny_export, tmp_path) -> None:
    publish_version(tmp_path, tiny_export.graphs, target="gpu", instances=2)
    for name in GRAPH_MODELS.values():
        cfg = read_config(tmp_path / name / "config.pbtxt")
        assert cfg.platform == "onnxruntime_onnx" and not cfg.backend
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and cfg.instance_group[0].count == 2
        (trt,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP32"
        assert sorted(p.name for p in (tmp_path / name / "1").iterdir()) == ["MODEL_VERSION", "model.onnx"]
        _check_config_matches_graph(cfg, onnx.load(str(tmp_path / name / "1" / "model.onnx")))
        # What the TensorRT parser would get (export/graphs.py's route 1): standard ops only.
        inlined = onnx.inliner.inline_local_functions(onnx.load(str(tmp_path / name / "1" / "model.onnx")))
        assert all(n.domain in ("", "ai.onnx") for n in inlined.graph.node)
