"""The stages composed, each verified and given its manifest, one module a stage.

model -> folded model -> FP32 ONNX (``fp32_onnx``: ``onnx_from_model``); foreign ONNX -> folded ONNX (``fold_onnx_file``);
FP32 ONNX -> FP16 / INT8 ONNX (``precision``: ``precision_from_onnx``); ONNX -> engine (``engine``:
``engine_from_onnx``, and all of ``resnet-export trt``: ``trt_from_source``); any artifact against PyTorch
(``artifact``: ``verify_artifact``); default output names (``outputs``). The shared decisions live in one place
each: gates by weights in ``checks.verify.plan_gate``, served = verified in ``checks.serving``.
"""

from .artifact import (
    recorded_reference,
    weights_random,
    stand_in_label,
    artifact_precision,
    artifact_preprocessing,
    verify_artifact,
    recorded_verification,
    recorded_source,
)
from .engine import EngineResult, engine_from_onnx, TrtResult, trt_from_source
from .fp32_onnx import OnnxResult, onnx_from_model, FoldOnnxResult, fold_onnx_file, foreign_preprocessing
from .outputs import side_onnx_path, default_output
from .precision import Attempt, PrecisionResult, REST_CHOICES, PrecisionRequest, precision_from_onnx
