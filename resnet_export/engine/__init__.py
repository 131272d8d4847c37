"""TensorRT: a plan built (``build``), run (``runner``) and read (``inspector``); TensorRT itself (``tensorrt``)."""

#: Each public name of the engine layer -> its module (loaded on first use: TensorRT is imported only where needed).
_NAMES = {
    "BatchProfile": "build",
    "BuildOptions": "build",
    "EngineBuild": "build",
    "EngineError": "tensorrt",
    "FORMAT_PRECISIONS": "inspector",
    "RuntimeInfo": "tensorrt",
    "TENSORRT_INSTALL": "tensorrt",
    "TORCH_DTYPES": "tensorrt",
    "TensorRTUnavailable": "tensorrt",
    "TrtRunner": "runner",
    "VERSION_COMPATIBLE_MAJORS": "tensorrt",
    "build_engine": "build",
    "check_profile": "build",
    "convolution_precisions": "inspector",
    "cuda_driver_version": "tensorrt",
    "cuda_version_text": "tensorrt",
    "engine_key": "tensorrt",
    "engine_layers": "inspector",
    "format_precision": "inspector",
    "gpu_caveat": "tensorrt",
    "incompatibility": "tensorrt",
    "load_manifest": "tensorrt",
    "logger": "tensorrt",
    "merge_timing_cache": "build",
    "network_io": "build",
    "onnx_io": "build",
    "profile_batch_sizes": "build",
    "read_timing_cache": "build",
    "require_tensorrt": "tensorrt",
    "runtime_info": "tensorrt",
    "tensorrt_cuda_major": "tensorrt",
    "this_platform": "tensorrt",
    "timing_cache_from": "build",
    "torch_dtype_name": "tensorrt",
    "unavailable_reason": "tensorrt",
    "write_timing_cache": "build",
}


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'resnet_export.engine' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
