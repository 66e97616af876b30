import pytest

from flowmaps.train.config import ConfigError, apply_override, read_config_file
from flowmaps.build import config_from_dict


def test_defaults_are_valid():
    cfg = config_from_dict({})
    assert cfg.method["name"] == "lsd" and cfg.data.name == "checkerboard"


@pytest.mark.parametrize(
    "values,msg",
    [
        ({"optim": {"lr": -1.0}}, "optim.lr must be positive"),
        ({"train": {"steps": -5}}, "train.steps must be positive"),
        ({"train": {"steps": "many"}}, "train.steps must be of type int"),
        ({"optim": {"learning_rate": 1e-3}}, r"unknown key\(s\) \['optim.learning_rate'\]"),
        ({"trian": {}}, r"unknown config section\(s\) \['trian'\]"),
        ({"method": {"name": "lsd", "diagonal_fraction": 1.5}}, "diagonal_fraction of method .lsd. must lie in"),
        ({"method": {"name": "lsd", "diag_frac": 0.5}}, r"has no option\(s\) \['diag_frac'\]"),
        ({"method": {"name": "magic"}}, "unknown method 'magic'"),
        ({"optim": {"optimizer": "sgd"}}, "optim.optimizer must be one of"),
        ({"eval": {"nfe": [1, 0]}}, "eval.nfe entries must be positive"),
        ({"eval": {"grid_rho": 0.0}}, "eval.grid_rho must be positive"),
        ({"eval": {"grid_rho": float("inf")}}, "eval.grid_rho must be a finite positive number"),
        ({"train": {"grad_accum": 0}}, "train.grad_accum must be positive"),
        ({"train": {"precision": "fp8"}}, "train.precision must be one of"),
        ({"train": {"compile": "yes"}}, "train.compile must be of type bool"),
        ({"checkpoint": {"every": -1}}, "checkpoint.every must be non-negative"),
        ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last must be positive"),
        ({"checkpoint": {"keep": 2}}, r"unknown key\(s\) \['checkpoint.keep'\]"),
        ({"guard": {"lr_factor": 0.0}}, r"guard.lr_factor must lie in \(0, 1\]"),
        ({"guard": {"on_divergence": "ignore"}}, "guard.on_divergence must be one of"),
        ({"guard": {"max_strikes": 0}}, "guard.max_strikes must be positive"),
        ({"distributed": {"backend": "mpi"}}, "distributed.backend must be one of"),
        ({"distributed": {"check_steps": -1}}, "distributed.check_steps must be non-negative"),
        ({"guidance": {"teacher_scale": -1.0}, "teacher": "exact", "model": {"num_classes": 2}},
         "guidance.teacher_scale must be non-negative"),
        ({"guidance": {"teacher_scale": float("nan")}}, "guidance.teacher_scale must be a finite non-negative number"),
        ({"guidance": {"teacher_scale": 2.0}, "model": {"num_classes": 2}}, "guide a distillation teacher"),
        ({"guidance": {"weak_teacher": "runs/weak"}, "model": {"num_classes": 2}}, "guide a distillation teacher"),
        ({"guidance": {"teacher_scale": 2.0}, "teacher": "exact"}, "guidance needs a class-conditional model"),
        ({"guidance": {"weak_teacher": 3}, "teacher": "exact"}, "guidance.weak_teacher must be of type str"),
        ({"method": {"name": "lsd", "diagonal_warmup": 1.0}}, "diagonal_warmup of method .lsd. must lie in"),
        ({"train": {"guidance_range": [2.0, 1.0]}, "model": {"num_classes": 2, "guidance": True}},
         r"train.guidance_range must be \[low, high\]"),
        ({"train": {"guidance_range": [1.0, 3.0]}, "model": {"num_classes": 2}}, "must be given together"),
        ({"model": {"num_classes": 2, "guidance": True}}, "must be given together"),
        ({"train": {"guidance_range": [1.0, 3.0]}, "model": {"guidance": True}}, "needs a class-conditional model"),
        ({"train": {"guidance_range": [0.0, 3.0], "guidance_draw": "gft"}, "model": {"num_classes": 2, "guidance": True}},
         "it needs train.guidance_range with low > 0"),
        ({"train": {"guidance_draw": "beta"}}, "train.guidance_draw must be one of"),
        ({"train": {"guidance_range": [1.0, 3.0]}, "model": {"num_classes": 2, "guidance": True}, "teacher": "exact",
          "guidance": {"teacher_scale": 2.0}}, "every example's own scale guides the teacher"),
    ],
)
def test_bad_values_name_the_key(values, msg):
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(values)


def test_files_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("method:\n  name: lsd\n  diagonal_fraction: 0.5\noptim:\n  lr: 3e-4\n")
    (tmp_path / "c.toml").write_text('[train]\nsteps = 10\n[method]\nname = "fm"\n')
    values = read_config_file(tmp_path / "c.yaml")
    apply_override(values, "train.batch_size=64")
    cfg = config_from_dict(values)
    assert cfg.optim.lr == 3e-4 and cfg.method["diagonal_fraction"] == 0.5 and cfg.train.batch_size == 64
    assert config_from_dict(read_config_file(tmp_path / "c.toml")).method == {"name": "fm"}
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override(values, "lr=3")
    with pytest.raises(ConfigError, match="must end in"):
        (tmp_path / "x.txt").write_text("a: 1")
        read_config_file(tmp_path / "x.txt")


def test_resolved_config_round_trips_with_the_training_sections(tmp_path):
    from flowmaps.train.config import CheckpointConfig, save_config
    from flowmaps.build import load_config

    cfg = config_from_dict({"checkpoint": {"every": 7}, "guard": {"on_divergence": "stop"}, "train": {"grad_accum": 2}})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    old = "train:\n  steps: 5\n"  # a config written before these sections existed still loads
    (tmp_path / "old.yaml").write_text(old)
    assert load_config(tmp_path / "old.yaml").checkpoint == CheckpointConfig()


def test_data_section_may_be_a_name():
    assert config_from_dict({"data": "moons"}).data.name == "moons"
    with pytest.raises(ConfigError, match="section 'data' must be a mapping"):
        config_from_dict({"data": 3})
