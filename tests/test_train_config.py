"""TrainConfig: validation, TOML, --set overrides, presets."""

from __future__ import annotations

import pytest
from looplens.models.train import TrainConfig, preset, preset_names, preset_summaries
from looplens.models.train.config import parse_assignment, parse_value, section_keys


def test_defaults_round_trip():
    cfg = TrainConfig()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed_by_field():
    cfg = TrainConfig().with_overrides([
        "optim.lr=3e-4", "optim.batch_size=64", "optim.grad_clip=none", "optim.orthograd=true",
        "eval.iterations=[1, 2, 8]", "model.d_head=none", "model.positional=none", "data.phi=3",
        "run.time_budget_minutes=1.5", "optim.no_decay=biases,norms",
    ])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.batch_size, int) and cfg.optim.batch_size == 64
    assert cfg.optim.grad_clip is None and cfg.optim.orthograd is True
    assert cfg.eval.iterations == [1, 2, 8]
    assert cfg.model.positional == "none" and cfg.data.phi == 3.0 and isinstance(cfg.data.phi, float)
    assert cfg.run.time_budget_minutes == 1.5 and cfg.optim.no_decay == ["biases", "norms"]


@pytest.mark.parametrize(
    "assignment, needle",
    [
        ("optim.lrate=1", "optim.lrate"),
        ("optimizer.lr=1", "unknown section 'optimizer'"),
        ("optim.batch_size=many", "optim.batch_size"),
        ("model.widht=3", "model.widht"),
        ("lr=3", "expected section.key"),
        ("optim.lr", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(assignment, needle):
    with pytest.raises(ValueError) as err:
        TrainConfig().with_overrides([assignment])
    assert needle in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError) as err:
        parse_assignment("recurrence.avg=4")
    message = str(err.value)
    for key in section_keys("recurrence"):
        assert key in message


@pytest.mark.parametrize(
    "assignment, needle",
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.schedule=exponential", "optim.schedule"),
        ("optim.loss=sparsemax", "optim.loss"),
        ("optim.atomic_share=1.5", "optim.atomic_share"),
        ("optim.no_decay=weights", "optim.no_decay"),
        ("recurrence.mode=gamma", "recurrence.mode"),
        ("recurrence.max=1", "recurrence.max"),
        ("recurrence.supervise=every", "recurrence.supervise"),
        ("model.d_model=30", "d_model"),
        ("model.positional=rotary", "positional"),
        ("data.n_entities=1", "n_entities"),
        ("run.device=tpu", "run.device"),
        ("run.stop_split=test_inferred_id", "run.stop_split"),
        ("eval.iterations=0", "eval.iterations"),
        ("curriculum.enabled=true", "curriculum.enabled"),  # composition task has no curriculum
    ],
)
def test_invalid_values_fail_naming_the_key(assignment, needle):
    with pytest.raises(ValueError) as err:
        TrainConfig().with_overrides([assignment])
    assert needle in str(err.value)


def test_from_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('summary = "x"\n[optim]\nlr = 0.002\n[model]\nn_iterations = 3\n')
    cfg = TrainConfig.from_toml(path)
    assert cfg.optim.lr == 0.002 and cfg.model.n_iterations == 3
    path.write_text("[optim]\nlearning_rate = 0.002\n")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_toml(path)
    path.write_text('[optim]\nbatch_size = "64"\n')  # a string is not an integer in a config file
    with pytest.raises(ValueError, match=r"--config .*c\.toml: optim\.batch_size must be an integer >= 1, got '64'"):
        TrainConfig.from_toml(path)
    with pytest.raises(FileNotFoundError):
        TrainConfig.from_toml(tmp_path / "missing.toml")


def test_parse_value():
    assert parse_value("1e4", "run", "max_steps") == 10000
    assert parse_value("null", "optim", "grad_clip") is None
    assert parse_value("none", "model", "positional") == "none"  # a choice named none stays a string
    assert parse_value("0.9, 0.98", "optim", "betas") == [0.9, 0.98]
    with pytest.raises(ValueError, match="optim.orthograd must be true or false, got 'maybe'"):
        parse_value("maybe", "optim", "orthograd")
    with pytest.raises(ValueError, match="optim.batch_size must be an integer >= 1, got 'true'"):
        parse_value("true", "optim", "batch_size")  # JSON's true is not the number 1


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("optim", {"lr": "fast"}, "optim.lr must be a finite number >= 0, got 'fast'"),
        ("optim", {"lr": float("inf")}, "optim.lr must be a finite number >= 0, got inf"),
        ("optim", {"batch_size": 1.5}, "optim.batch_size must be an integer >= 1, got 1.5"),
        ("optim", {"batch_size": True}, "optim.batch_size must be an integer >= 1, got True"),
        ("optim", {"betas": [0.9]}, "optim.betas must be a list of 2 items, each a number in [0, 1), got [0.9]"),
        ("optim", {"schedule": "exp"}, "optim.schedule must be one of constant, linear, cosine, got 'exp'"),
        ("eval", {"halting": "kl2"}, "eval.halting must be one of kl, entropy, kl+entropy, latent (or none)"),
        ("model", {"n_blocks": "4"}, "model.n_blocks must be an integer >= 1, got '4'"),
        ("data", {"ood_fraction": 1.0}, "data.ood_fraction must be a number in [0, 1), got 1.0"),
        ("run", {"log_checkpoints": "yes"}, "run.log_checkpoints must be true or false, got 'yes'"),
    ],
)
def test_config_values_of_the_wrong_type_fail_naming_the_key(tmp_path, section, values, message):
    """TOML / JSON values are checked strictly (no "4" for an int), and the error names section.key."""
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict({section: values})
    assert str(err.value) == message or str(err.value).startswith(message), str(err.value)


def test_numpy_scalars_and_tuples_become_plain_values():
    import numpy as np
    from looplens.data import DataConfig

    cfg = DataConfig(n_entities=np.int64(50), phi=np.float32(2.0), ood_fraction=0)
    assert type(cfg.n_entities) is int and type(cfg.phi) is float and type(cfg.ood_fraction) is float
    assert TrainConfig.from_dict({"optim": {"betas": (0.9, 0.95)}}).optim.betas == [0.9, 0.95]


@pytest.mark.slow
def test_validation_does_not_import_pydantic_until_used():
    import subprocess
    import sys

    code = ("import sys\nimport looplens.models.train.config, looplens.data.config\n"
            "assert 'pydantic' not in sys.modules\n"
            "looplens.models.train.config.TrainConfig()\nassert 'pydantic' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_presets_load_and_describe_themselves():
    names = preset_names()
    for required in ("paper-composition", "paper-composition-code", "paper-depth", "paper-depth-r8",
                     "paper-depth-dynamic", "tiny-composition", "tiny-depth", "smoke-composition", "smoke-depth"):
        assert required in names
    summaries = preset_summaries()
    for name in names:
        cfg = preset(name)
        assert isinstance(cfg, TrainConfig)
        assert summaries[name] and "\n" not in summaries[name]


def test_paper_presets_match_paper_values():
    comp, code, depth = preset("paper-composition"), preset("paper-composition-code"), preset("paper-depth")
    assert (comp.data.n_entities, comp.data.n_relations, comp.data.out_degree) == (2000, 200, 20)
    assert (comp.model.d_model, comp.model.n_heads, comp.model.n_blocks) == (768, 12, 4)
    assert comp.optim.lr == 1e-4 and comp.optim.warmup_steps == 2000 and comp.optim.batch_size == 512
    assert comp.optim.weight_decay == 0.01
    assert (code.optim.weight_decay, code.optim.batch_size, code.optim.label_smoothing, code.model.dropout) == (0.1, 128, 0.1, 0.1)
    assert depth.model.positional == "none" and depth.model.zero_init_out
    assert depth.curriculum.enabled and depth.optim.weight_decay == 0.01 and depth.optim.batch_size == 128
    assert depth.optim.label_smoothing == 0.0
    dyn = preset("paper-depth-dynamic").recurrence
    assert (dyn.mode, dyn.mean, dyn.min, dyn.max) == ("poisson", 4.0, 2, 8)


def test_integers_in_toml_are_accepted_for_float_fields(tmp_path):
    path = tmp_path / "ints.toml"
    path.write_text("[optim]\nlr = 1\nbetas = [0, 0]\n[recurrence]\nmode = \"poisson\"\nmean = 4\n")
    cfg = TrainConfig.from_toml(path)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.recurrence.mean == 4.0
    assert cfg.optim.betas == [0.0, 0.0]
