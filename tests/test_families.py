"""The family registry is the one place that names a model family: every other module reads it."""
import ast
import re
from pathlib import Path

import pytest

from vlmlab.families import FAMILIES, MODULE_GROUPS, family_of_config, family_record, parameter_group, UnknownFamilyError

LIB = Path(__file__).resolve().parents[1] / 'vlmlab'
ALLOWED = {'families.py', 'tiny.py', '_modidx.py'}   # the registry itself, the tiny kit's build recipes, nbdev's index
NAME = re.compile(r'\b(' + '|'.join(sorted(map(re.escape, FAMILIES), key=len, reverse=True)) + r')\b')

def docstring_nodes(tree: ast.AST) -> set[int]:
    "ids of the Constant nodes that are docstrings (prose, allowed to name families)."
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out

def family_literals(source: str) -> list[tuple[int, str]]:
    "(line, literal) of every string constant outside docstrings that names a family."
    tree = ast.parse(source)
    docs = docstring_nodes(tree)
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs and NAME.search(n.value)]

def test_scanner_sees_a_literal_and_ignores_prose():
    src = 'def f(family="qwen3_vl"):\n    "Works for qwen2_vl."\n    # qwen2_5_vl in a comment\n    return family == "qwen2_vl"\n'
    assert [v for _, v in family_literals(src)] == ['qwen3_vl', 'qwen2_vl']
    assert family_literals('x = f"tiny-kit/{name}"') == []
    assert family_literals('x = "tiny-kit/qwen3_5_moe"') == [(1, 'tiny-kit/qwen3_5_moe')]

@pytest.mark.parametrize('path', sorted(p.name for p in LIB.glob('*.py') if p.name not in ALLOWED))
def test_no_family_name_outside_the_registry(path):
    found = family_literals((LIB / path).read_text())
    assert not found, f"vlmlab/{path} names a family as a literal (read vlmlab.families instead): {found}"

def test_every_module_is_scanned():
    scanned = {p.name for p in LIB.glob('*.py')} - ALLOWED
    assert {'tokens.py', 'vision.py', 'chat.py', 'model.py', 'cli.py', 'doctor.py', 'detection.py', 'data.py'} <= scanned

def test_lookup_by_config_names_what_is_supported():
    class Cfg: model_type = 'llava'
    with pytest.raises(UnknownFamilyError, match='qwen3_vl_moe'): family_of_config(Cfg())
    Cfg.model_type = 'qwen3_vl_moe'
    assert family_of_config(Cfg()).moe and family_record('qwen3_vl_moe').factor == 32

def test_qwen3_vl_moe_loads_with_experts_and_router_groups():
    from vlmlab.checkpoints import load_model
    from vlmlab.config import ModelConfig
    from vlmlab.model import apply_stage, group_parameters
    m = load_model(ModelConfig(name_or_path='tiny-kit/qwen3_vl_moe'))
    assert m.family == 'qwen3_vl_moe'
    sizes = {g: sum(p.numel() for _, p in ps) for g, ps in group_parameters(m).items()}
    assert set(sizes) == set(MODULE_GROUPS) and sizes['experts'] > 0 and sizes['router'] > 0
    assert all('.mlp.experts.' in n for n, _ in group_parameters(m)['experts'])
    counts = apply_stage(m, 'stage2')
    assert counts['experts'] == sizes['experts'] and counts['router'] == sizes['router'] and counts['vision'] == 0

def test_dense_families_have_empty_moe_groups():
    from vlmlab.checkpoints import load_model
    from vlmlab.config import ModelConfig
    from vlmlab.model import group_parameters
    m = load_model(ModelConfig(name_or_path='tiny-kit/qwen3_vl'))
    g = group_parameters(m)
    assert g['experts'] == [] and g['router'] == [] and g['llm']
    assert parameter_group('model.language_model.layers.0.mlp.gate_proj.weight') == 'llm'
