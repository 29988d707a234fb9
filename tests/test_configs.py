"""The example configs load; config files are parsed safely and their errors name the key."""
from pathlib import Path

import pytest

from vlmlab.config import ConfigError, VLMLabConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / 'configs').glob('*.yaml'))


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = VLMLabConfig.from_yaml(path)
    assert cfg.model.name_or_path and cfg.training.output_dir
    assert VLMLabConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_never_executes_code(tmp_path):
    p = tmp_path / 'evil.yaml'
    p.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match='not valid YAML'):
        VLMLabConfig.from_yaml(p)
    assert not (tmp_path / 'pwned').exists() and not Path('pwned').exists()


def test_errors_name_file_and_key(tmp_path):
    p = tmp_path / 'c.yaml'
    p.write_text('training:\n  gradient_accumulation_step: 4\n')
    with pytest.raises(ConfigError, match=r"c\.yaml: training\.gradient_accumulation_step: unknown key \(did you mean 'gradient_accumulation_steps'\?\)"):
        VLMLabConfig.from_yaml(p)
