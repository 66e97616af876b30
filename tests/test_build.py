"""What a run records of its defaults (``flowmaps.build.resolve_config``), and how records from before
that are read (``recorded_model``): driven by the backbone registry."""

import dataclasses

import pytest
import torch
import yaml

import flowmaps
from flowmaps.build import (
    build_model,
    config_from_dict,
    configured_method_options,
    load_run_config,
    recorded_model,
    resolve_config,
)
from flowmaps.methods import build_method, get_method_class, method_names
from flowmaps.nets import backbone_entry, backbone_names
from flowmaps.schedules import get_schedule
from flowmaps.train.config import DEFAULT_LR
from flowmaps.train.loop import train
from tests.train.tiny import tiny_config


@pytest.mark.parametrize("name", backbone_names())
def test_every_backbone_option_is_resolved_and_the_learning_rate_defaults(name):
    options = backbone_entry(name).options
    values = {"model": {"backbone": name, **options.tiny}}
    resolved = resolve_config(config_from_dict(values), options.test_shape)
    assert resolved.optim.lr == DEFAULT_LR
    assert set(resolved.model.options) == {f.name for f in dataclasses.fields(options)}
    assert None not in resolved.model.options.values()  # every shape-dependent default is filled in
    given = resolve_config(config_from_dict({**values, "optim": {"lr": 1.5e-4}}), options.test_shape)
    assert given.optim.lr == 1.5e-4


@pytest.mark.parametrize("name", method_names())
def test_a_methods_backbone_defaults_apply_where_the_config_is_silent(name):
    """``Method.backbone_defaults`` fill ``optim.lr`` and backbone options that the config leaves
    unset; what the config sets wins (driven by the method registry)."""
    method = build_method(name, get_schedule("linear"), teacher=object() if get_method_class(name).needs_teacher
                          else None)
    for backbone, tuned in type(method).backbone_defaults.items():
        options = backbone_entry(backbone).options
        shape = (2,) if backbone == "mlp" else options.test_shape
        cfg = config_from_dict({"method": {"name": name}, "model": {"backbone": backbone}})
        resolved = resolve_config(cfg, shape, method)
        assert resolved.optim.lr == tuned.get("lr", DEFAULT_LR)
        expected = options(**{k: v for k, v in tuned.items() if k != "lr"}).resolved(shape)
        assert resolved.model.options == dataclasses.asdict(expected)
        given = config_from_dict({"method": {"name": name}, "optim": {"lr": 1e-4},
                                  "model": {"backbone": backbone, **dataclasses.asdict(options())}})
        assert resolve_config(given, shape, method).model.options == dataclasses.asdict(options().resolved(shape))
        assert resolve_config(given, shape, method).optim.lr == 1e-4


@pytest.mark.parametrize("name", method_names())
def test_a_methods_backbone_preset_applies_where_the_config_names_none(name):
    """``Method.backbone_presets``: on such a backbone a config without a preset trains with that preset's
    values (its own options still win); a preset the config names is kept; other backbones keep the default
    (driven by the method registry)."""
    cls = get_method_class(name)
    teacher = object() if cls.needs_teacher else None
    given = {"teacher": "exact"} if cls.needs_teacher else {}
    for backbone in backbone_names():
        cfg = config_from_dict({"method": {"name": name}, "model": {"backbone": backbone}, **given})
        options = configured_method_options(cfg)
        preset = cls.backbone_presets.get(backbone)
        assert options.get("preset") == preset
        built = build_method(name, get_schedule("linear"), teacher=teacher, **options).options
        default = build_method(name, get_schedule("linear"), teacher=teacher).options
        if preset is None:
            assert built == default
            continue
        assert {k: getattr(built, k) for k in cls.presets[preset]} == cls.presets[preset]
        other = next(p for p in cls.presets if p != preset)
        named = config_from_dict({"method": {"name": name, "preset": other}, "model": {"backbone": backbone}, **given})
        assert configured_method_options(named) == {"preset": other}


def test_lsd_trains_its_paper_preset_on_the_image_backbones_and_robust_on_the_mlp():
    for backbone, preset in (("mlp", "robust"), ("unet", "paper"), ("dit", "paper")):
        cfg = config_from_dict({"method": {"name": "lsd", "grid_weight": 2.0}, "model": {"backbone": backbone}})
        options = build_method("lsd", get_schedule("linear"), **configured_method_options(cfg)).options
        assert options.preset == preset and options.grid_weight == 2.0
        assert options.diagonal_target == ("batch_posterior" if preset == "robust" else "conditional")


def test_lsd_on_the_mlp_takes_fourier_features_of_low_dimensional_samples_only():
    lsd = build_method("lsd", get_schedule("linear"))
    cfg = config_from_dict({"model": {"width": 16}})
    assert resolve_config(cfg, (2,), lsd).model.options["x_features"] == 128
    assert resolve_config(cfg, (16,), lsd).model.options["x_features"] == 0
    assert resolve_config(cfg, (2,)).model.options["x_features"] == 0  # the MLP's own default
    assert resolve_config(config_from_dict({"model": {"x_features": 8}}), (2,), lsd).model.options["x_features"] == 8
    assert resolve_config(cfg, (2,), lsd).optim.lr == 5e-3


def test_a_run_records_every_default_it_trained_with_and_loads_from_the_record(tmp_path):
    run = train(tiny_config(train={"steps": 4}), tmp_path / "run", progress=False, evaluate_at_end=False).run_dir
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["optim"]["lr"] == 5e-3  # LSD's rate on the MLP
    assert record["model"]["x_features"] == 128 and record["model"]["x_scale"] == 0.5
    assert record["method"]["preset"] == "robust" and record["method"]["grid_rho"] == 2.0
    assert recorded_model(record["model"]) == record["model"]  # a full record is read as it is
    flowmaps.load(run)


def test_a_record_from_before_takes_the_defaults_it_trained_with(tmp_path):
    """A run directory written before runs recorded every backbone option lacks some: its model is built
    with the defaults of then (``legacy``: Fourier features of scale 1), not today's, so it is the model
    its weights were trained as."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"backbone": "mlp", "num_classes": 0, "width": 16, "x_features": 8},
                                    "optim": {"lr": 0.002}}))
    cfg = load_run_config(path)
    assert cfg.model.options == {"x_scale": 1.0, "width": 16, "x_features": 8}
    then = config_from_dict({"model": {"width": 16, "x_features": 8, "x_scale": 1.0}})
    now = config_from_dict({"model": {"width": 16, "x_features": 8}})
    built = {}
    for name, c in (("record", cfg), ("then", then), ("now", now)):
        torch.manual_seed(0)
        built[name] = build_model(c, (2,)).state_dict()["net.x_embed.proj"]
    assert torch.equal(built["record"], built["then"]) and not torch.equal(built["record"], built["now"])
    assert recorded_model("unknown-backbone") == "unknown-backbone"  # left for config_from_dict to name
