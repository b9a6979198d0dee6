"""fastlora.io sits below the ops: none of its modules imports another part of fastlora."""
import ast
from pathlib import Path

IO = Path(__file__).resolve().parents[1] / "fastlora" / "io"


def test_io_imports_nothing_else_from_fastlora():
    for path in IO.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), f"{path.name}: from {'.' * node.level}{node.module} import ..."
                assert node.level == 1 or not (node.module or "").startswith(("fastlora", "kernels")), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith(("fastlora", "kernels")) for a in node.names), path.name
