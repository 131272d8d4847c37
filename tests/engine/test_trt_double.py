"""The TensorRT double (tests/trt_double/tensorrt.py) holds nothing the real bindings lack.

Every class, method, attribute, keyword and enum member of the double must exist in the real
``tensorrt`` bindings of each version in tools/trt_api_versions (their .pyi stubs, which
`make api-check` makes from the real wheels under .venv/trt-api; `.ci/run` makes them before the tests).
Names private to the double start with ``_``; dunder methods other than ``__init__`` stand for
protocols the real classes support (``bytes(IHostMemory)`` is the buffer protocol).
"""

from __future__ import annotations

import ast
import keyword
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
DOUBLE = Path(__file__).parent.parent / "trt_double" / "tensorrt.py"
VERSIONS = (ROOT / "tools" / "trt_api_versions").read_text().split()
STUBS = Path(sys.prefix) / "trt-api"


class Surface:
    """A class's names (methods, attributes, enum members), each method's keywords, and its nested classes."""

    def __init__(self, node: ast.ClassDef | ast.Module):
        self.bases = [b.id for b in getattr(node, "bases", []) if isinstance(b, ast.Name)]
        self.names: set[str] = set()
        self.keywords: dict[str, set[str] | None] = {}  # None: takes any keyword (*args/**kwargs)
        self.classes: dict[str, Surface] = {}
        for item in node.body:
            if isinstance(item, ast.ClassDef):
                self.classes[item.name] = Surface(item)
                self.names.add(item.name)
            elif isinstance(item, ast.FunctionDef):
                self.names.add(item.name)
                args = item.args
                names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs} - {"self", "this"}
                any_keyword = args.vararg is not None or args.kwarg is not None
                known = self.keywords.get(item.name, set())
                self.keywords[item.name] = None if any_keyword or known is None else known | names
                for sub in ast.walk(item):  # attributes the double sets on its instances
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and \
                            isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        self.names.add(sub.attr)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                self.names.add(item.target.id)
            elif isinstance(item, ast.Assign):
                self.names |= {t.id for t in item.targets if isinstance(t, ast.Name)}


#: A default value in a signature (pybind11-stubgen writes some that Python cannot parse after it).
DEFAULT = re.compile(r"\s*=\s*(?:[^,()\[\]]|\([^)]*\)|\[[^\]]*\])+(?=[,)])")
#: A parameter named after a Python keyword (the bindings have ``in``).
KEYWORD = re.compile(rf"(?<=[(,] )({'|'.join(keyword.kwlist)})(?=:)")


def parse(path: Path) -> Surface:
    """The surface of a module's source or stub; defaults are dropped (only names and keywords matter)."""
    lines = path.read_text().splitlines()
    return Surface(ast.parse("\n".join(KEYWORD.sub(r"\1_", DEFAULT.sub("", line)) if line.lstrip().startswith("def ")
                                       else line for line in lines)))


def lacks(double: Surface, real: Surface, real_module: Surface, where: str) -> list[str]:
    """What ``double`` has that ``real`` (with its bases from ``real_module``) lacks."""
    names, keywords = set(real.names), dict(real.keywords)
    for base in real.bases:
        if base in real_module.classes:
            names |= real_module.classes[base].names
            keywords = {**real_module.classes[base].keywords, **keywords}
    missing = []
    for name in sorted(double.names):
        public = not name.startswith("_") or name == "__init__"
        if not public or (name == "__init__" and "__init__" not in names):
            continue  # the double's own state, or the constructor of a class only TensorRT creates
        if name not in names:
            missing.append(f"{where}.{name}")
        elif name in double.classes:
            missing += lacks(double.classes[name], real.classes.get(name, Surface(ast.Module(body=[]))), real_module,
                             f"{where}.{name}")
        elif name in double.keywords and keywords.get(name) is not None:
            missing += [f"{where}.{name}({k}=)" for k in sorted(double.keywords[name] - keywords[name])]
    return missing


@pytest.mark.parametrize("version", VERSIONS)
def test_the_double_has_nothing_the_real_bindings_lack(version):
    stub = STUBS / version / "stubs" / "tensorrt" / "tensorrt.pyi"
    if not stub.is_file():
        pytest.skip(f"no stubs of TensorRT {version}'s real bindings at {stub}: `make api-check` makes them")
    real, double = parse(stub), parse(DOUBLE)
    missing = []
    for name in sorted(n for n in double.names if not n.startswith("_")):
        if name not in real.classes:
            missing.append(name)
            continue
        missing += lacks(double.classes[name], real.classes[name], real, name)
    assert missing == [], f"the double has what TensorRT {version} lacks: {missing}"


def test_the_check_sees_a_member_a_method_and_a_keyword_the_real_api_lacks(tmp_path):
    """Removed in TensorRT 11: BuilderFlag.FP16 and IBuilderConfig.int8_calibrator; never a keyword: `stream`."""
    real = Surface(ast.parse(
        "class BuilderFlag:\n    TF32: int\nclass IBuilderConfig:\n    def set_flag(self, flag: int) -> None: ...\n"))
    double = Surface(ast.parse(
        "class BuilderFlag:\n    TF32 = 1\n    FP16 = 2\n"
        "class IBuilderConfig:\n    def set_flag(self, flag, stream=None): ...\n"
        "    def _own(self): self.int8_calibrator = None\n"))
    missing = [m for name in ("BuilderFlag", "IBuilderConfig")
               for m in lacks(double.classes[name], real.classes[name], real, name)]
    assert missing == ["BuilderFlag.FP16", "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_flag(stream=)"]
