"""Triton Python-backend model: run one HMAT ONNX graph with ONNX Runtime (CPU target).

Copied by serving/repository.py into every version directory as ``model.py``; it runs in
Triton's Python backend stub, not in the project's interpreter, so it imports only the
standard library, numpy, onnxruntime and Triton's ``triton_python_backend_utils``. The stub
runs in isolated mode (PYTHONPATH is ignored): ``HISAM_TRITON_PYTHONPATH``, set by
infra/triton.py, names the directories holding numpy<2 and onnxruntime for it
(scripts/install_triton.sh explains why numpy<2).

Inputs and outputs are whatever the graph declares (config.pbtxt is generated from the same
graph). Requests are run one by one: their stream lengths differ, so they cannot share one
batch. A failing request gets an error response; the others in the same call are unaffected.
"""

import json
import os
import sys

for _p in reversed(os.environ.get("HISAM_TRITON_PYTHONPATH", "").split(os.pathsep)):
    if _p and _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads") or 1)
        options.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feed = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
                results = self.session.run(self.outputs, feed)
                tensors = [pb_utils.Tensor(n, _triton_array(r)) for n, r in zip(self.outputs, results)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as e:  # noqa: BLE001 - reported to the caller, not raised into the stub
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}")))
        return responses

    def finalize(self):
        self.session = None


def _triton_array(a):
    """ONNX Runtime returns strings as str objects; Triton's BYTES tensors hold bytes."""
    a = np.asarray(a)
    if a.dtype.kind in ("U", "O"):
        return np.array([s.encode() if isinstance(s, str) else s for s in a.reshape(-1)], dtype=np.object_).reshape(
            a.shape
        )
    return np.ascontiguousarray(a)
