"""Arrows point down: the low layers (layers/, models/, attention/, kvcache/) never import from the
engine or the server, so each can be reused and tested without them."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "radixserve"
LOW = ("layers", "models", "attention", "kvcache")
HIGH = ("radixserve.engine", "radixserve.engine_unit", "radixserve.server", "radixserve.scheduler",
        "radixserve.llm", "radixserve.shell", "radixserve.bench")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
    return names


@pytest.mark.parametrize("room", LOW)
def test_low_layers_do_not_import_upward(room: str) -> None:
    files = sorted((PKG / room).rglob("*.py"))
    assert files, f"no modules under radixserve/{room}"
    bad = [f"{f.relative_to(PKG)} imports {m}" for f in files for m in _imports(f)
           if any(m == h or m.startswith(h + ".") for h in HIGH)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("room", ["scheduler", "engine", "grammar", "kernels"])
def test_engine_side_does_not_import_the_server(room: str) -> None:
    """The scheduler runs in its own process and offline (LLM, benchmarks): nothing below the API server
    imports from it (the grammar engine is its own room, used by the scheduler and the server alike)."""
    files = sorted((PKG / room).rglob("*.py"))
    assert files, f"no modules under radixserve/{room}"
    bad = [f"{f.relative_to(PKG)} imports {m}" for f in files for m in _imports(f)
           if m == "radixserve.server" or m.startswith("radixserve.server.")]
    assert not bad, "imports from the server:\n" + "\n".join(bad)


def test_launcher_checks_the_model_without_torch() -> None:
    """The launcher parses flags and checks the bundled model before it spawns the scheduler; none of that
    may import torch (~2.5 s on the 2-core machine that every child would wait for), and neither may the
    API server's tokenizer. On a machine with a GPU device node, choosing --device auto needs torch."""
    import subprocess
    import sys

    from radixserve.args import GPU_DEVICE_NODES
    if any(os.path.exists(n) for n in GPU_DEVICE_NODES):
        pytest.skip("a GPU device node exists: --device auto asks torch")
    code = ("import sys\n"
            "from radixserve.args import parse_args\n"
            "from radixserve.server.launch import check_model\n"
            "from radixserve.server.tokenizer_manager import TokenizerManager\n"
            "from radixserve.server.api import create_app\n"
            "args = parse_args([])\n"
            "check_model(args)\n"
            "assert args.device == 'cpu'\n"
            "print(sorted(m for m in ('torch', 'numpy', 'triton') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
