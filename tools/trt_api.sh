#!/bin/bash
# Import the real TensorRT Python bindings of VERSION without TensorRT's libraries, for API-surface checks only.
# The bindings wheel (PyPI, ~1.3 MB) is real; its libnvinfer/libnvonnxparser are replaced by a loader shim
# whose factory functions return NULL, so nothing can be built or run: only names, signatures and enums exist.
# Usage: trt_api.sh VERSION DIR   -> DIR/shim (PYTHONPATH), DIR/lib (LD_LIBRARY_PATH)
# (A copy of the team's shared/tools/trt_api.sh, kept here so that `make api-check` works in any clone; the wheel is
# unpacked with Python's zipfile instead of unzip.)
set -euo pipefail
ver=$1; dir=$2; py=${PYTHON:-python3}
mkdir -p "$dir"/{dl,shim,lib}
major=${ver%%.*}
[[ -f $dir/.done ]] && exit 0
$py -m pip download -q --no-deps "tensorrt-cu12-bindings==$ver" -d "$dir/dl"
(cd "$dir/shim" && $py -m zipfile -e "$dir"/dl/*.whl . && ln -sfn tensorrt_bindings tensorrt)
cat > "$dir/stub.c" <<'C'
#include <stddef.h>
void* createInferBuilder_INTERNAL(void* l, int v){return NULL;}
void* createInferRefitter_INTERNAL(void* e, void* l, int v){return NULL;}
void* createInferRuntime_INTERNAL(void* l, int v){return NULL;}
void* getPluginRegistry(void){return NULL;}
void* getBuilderPluginRegistry(int x){return NULL;}
int initLibNvInferPlugins(void* l, const char* n){return 0;}
void* createNvOnnxParser_INTERNAL(void* n, void* l, int v){return NULL;}
void* createNvOnnxParserRefitter_INTERNAL(void* r, void* l, int v){return NULL;}
int getNvOnnxParserVersion(void){return 0;}
int getInferLibVersion(void){return 0;}
C
for l in nvinfer nvinfer_plugin nvonnxparser; do gcc -shared -fPIC -o "$dir/lib/lib$l.so.$major" "$dir/stub.c"; done
# any other NEEDED TensorRT library of this version gets the same shim
for l in $(readelf -d "$dir"/shim/tensorrt_bindings/tensorrt.so | sed -n 's/.*\[\(libnv[^]]*\)\].*/\1/p'); do
  [[ -f $dir/lib/$l ]] || cp "$dir/lib/libnvinfer.so.$major" "$dir/lib/$l"; done
LD_LIBRARY_PATH=$dir/lib PYTHONPATH=$dir/shim $py -c "import tensorrt as t; print('tensorrt', t.__version__)"
touch "$dir/.done"
