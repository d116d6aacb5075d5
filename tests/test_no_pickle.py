"""No pickle anywhere in jpeft/: checkpoints go through orbax and safetensors only."""

from __future__ import annotations

import ast
import pathlib

import jpeft

UNSAFE_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _sources():
    root = pathlib.Path(jpeft.__file__).parent
    return sorted(root.rglob("*.py"))


def test_jpeft_never_imports_a_pickle_module_or_allows_pickle():
    offenders = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                names = []
            offenders += [f"{path}:{node.lineno} imports {n}" for n in names if n in UNSAFE_MODULES]
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        offenders.append(f"{path}:{node.lineno} passes allow_pickle={ast.unparse(kw.value)}")
                func = ast.unparse(node.func)
                if func in ("torch.load", "np.load", "numpy.load") and not any(k.arg == "allow_pickle" for k in node.keywords):
                    offenders.append(f"{path}:{node.lineno} calls {func} (pickle by default)")
    assert len(_sources()) > 10
    assert not offenders, offenders


def test_the_scanner_catches_pickle(tmp_path):
    bad = "import pickle\nimport numpy as np\nnp.load('x', allow_pickle=True)\n"
    tree = ast.parse(bad)
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import) and n.names[0].name in UNSAFE_MODULES]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and any(k.arg == "allow_pickle" for k in n.keywords)]
    assert imports and calls
