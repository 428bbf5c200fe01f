"""The package's shape: no import cycle, and the model code imports no IO, training or
generation code (execution choices are applied to a finished model from outside)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
# What a reader follows to see the paper's computation, and what it may rest on.
MODEL_SIDE = {"model", "encoder", "decoder", "global_transformer", "entropy_model", "layers", "masks", "patcher",
              "ngram_hash", "config", "tokens"}  # fmt: skip
OUTSIDE = {"train", "train_entropy", "train_flags", "train_data", "train_state", "distributed", "one_graph",
           "execution", "generate", "engine", "prefill", "kv_cache", "step_layers", "sampling", "cpu_threads",
           "checkpoint", "convert_hf", "data", "eval", "export", "visualize", "robustness", "bpe", "train_bpe"}  # fmt: skip


def imports() -> dict[str, set[str]]:
    """Module -> the blt modules it imports anywhere in its body (inside functions too)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "blt":
                if node.module == "blt":  # from blt import masks as M
                    found |= {alias.name for alias in node.names}
                else:
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("blt.")}
        graph[path.stem] = found - {path.stem, "__init__", "tests"}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycle():
    graph = imports()
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_model_code_imports_no_io_training_or_generation():
    graph = imports()
    assert MODEL_SIDE <= set(graph) and OUTSIDE <= set(graph)  # the lists name real modules
    for module in sorted(MODEL_SIDE):
        assert not reachable(graph, module) & OUTSIDE, f"{module} reaches {sorted(reachable(graph, module) & OUTSIDE)}"
