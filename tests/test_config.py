from pathlib import Path

import pytest

from mmtard.config import Config, apply_overrides, load_config
from mmtard.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_validate(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.train.steps >= 1


def test_paper_recipe_matches_method_section_7():
    config = load_config(Path(__file__).parents[1] / "configs" / "paper_vitb32_mmt_ard.yaml")
    assert (config.student.name, config.student.pretrained) == ("ViT-B-32", "openai")
    assert [t.name for t in config.teachers] == ["ViT-L-14", "ViT-L-14"]
    assert sorted(t.role for t in config.teachers) == ["clean", "robust"]
    assert config.train.global_batch == 512 and config.train.steps == 5000
    assert config.train.lr == pytest.approx(2e-5) and config.train.weight_decay == pytest.approx(1e-4)
    assert config.train.warmup_frac == pytest.approx(0.07)
    pgd = config.attack.pgd()
    assert pgd.eps == pytest.approx(2 / 255) and pgd.step_size == pytest.approx(1 / 255) and pgd.steps == 10


def test_unknown_key_names_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {stpes: 3}\n")
    with pytest.raises(ConfigError, match="unknown key 'stpes'.*Did you mean 'steps'"):
        load_config(path)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown method 'mmtard'.*mmt_ard"):
        load_config(None, ["method.name=mmtard"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(None, ["train.steps=many"])


def test_eps_above_one_suggests_255():
    with pytest.raises(ConfigError, match="8/255"):
        load_config(None, ["attack.eps=8", "method.name=tecoa"])


def test_overrides_reach_list_items():
    data = {"teachers": [{"name": "a"}, {"name": "b"}]}
    apply_overrides(data, ["teachers.1.pretrained=/x.pt", "train.lr=1e-3"])
    assert data["teachers"][1]["pretrained"] == "/x.pt"
    assert load_config(None, ["train.lr=1e-3", "method.name=tecoa"]).train.lr == 1e-3
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(data, ["teachers.5.name=x"])


def test_method_needs_its_teacher_roles():
    with pytest.raises(ConfigError, match="role 'clean'"):
        load_config(None, ["method.name=mmt_ard", "teachers=[{name: mmtard-small-vit, role: robust}]"])
    config = load_config(None, ["method.name=mmt_ard", "method.use_clean=false",
                                "teachers=[{name: mmtard-small-vit, role: robust}]"])
    assert not config.method.use_clean


def test_override_below_a_value_is_refused():
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(None, ["student=abc", "student.name=x"])


def test_unknown_data_source_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="data.source"):
        load_config(None, ["data.source=webdataset"])


def test_plain_override_values_are_read_as_their_fields_type_not_as_yaml():
    """YAML 1.1 would read 0777 as 511, 1.10 as 1.1, 010 as octal 8 and drop '#2 model' as a comment."""
    config = load_config(None, ["method.name=tecoa", "data.root=0777", "student.pretrained=1.10", "train.seed=010",
                                "train.lora=true", "train.micro_batch=null", 'data.templates=["a {}", "b {}"]',
                                "student.name=/models/my #2 model"])
    assert config.data.root == "0777" and config.student.pretrained == "1.10" and config.train.seed == 10
    assert config.train.lora is True and config.train.micro_batch is None and config.data.templates == ["a {}", "b {}"]
    assert config.student.name == "/models/my #2 model"
    with pytest.raises(ConfigError, match="override 'data.templates': cannot read"):
        load_config(None, ["method.name=tecoa", 'data.templates=["a {}", "b'])
    with pytest.raises(ConfigError, match="train.seed: expected an integer, got '0x1F'"):
        load_config(None, ["method.name=tecoa", "train.seed=0x1F"])
