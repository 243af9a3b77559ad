"""Config loading in the LLaMA-Factory dialect."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from wsi_llava.config import (
    SYSTEM_PROMPT_DEFAULT,
    ConfigError,
    config_from_dict,
    config_reference,
    load_config,
    parse_overrides,
    translate_dialect,
)
from wsi_llava.errors import WsiLlavaError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["stage2_projector.yaml", "stage3_vqa_lora.yaml"])
def test_seed_configs_parse(name, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_config(CONFIGS / name)
    assert cfg.model.vision_mode == "wsi" and cfg.model.image_seq_length == 1536
    assert cfg.training["gradient_accumulation_steps"] == 16
    assert "warmup_ratio" not in cfg.training and "overwrite_output_dir" not in cfg.training
    assert cfg.model.model_name_or_path is None  # custom_llava placeholder
    assert sum("ignoring keys" in r.message for r in caplog.records) == 1  # one warning for all dead keys
    assert "mm_use_im_patch_token" in caplog.text


def test_stage3_specifics():
    cfg = load_config(CONFIGS / "stage3_vqa_lora.yaml")
    f = cfg.finetuning
    assert f.finetuning_type == "lora" and f.lora_rank == 32 and f.lora_alpha == 64 and f.loraplus_lr_ratio == 10.0
    assert "linear_1" in f.lora_target and f.do_sanity_check
    assert cfg.training["warmup_steps"] == 0.1  # warmup_ratio → warmup_steps as a ratio (transformers 5)
    assert cfg.model.projector_path.endswith("projector.safetensors")


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"'lora_rnak' \(did you mean 'lora_rank'\?\)"):
        config_from_dict({"llm_name_or_path": "x", "dataset": "d", "output_dir": "o", "lora_rnak": 8})


def test_required_and_cross_field_errors():
    with pytest.raises(ConfigError, match="llm_name_or_path"):
        config_from_dict({"dataset": "d", "output_dir": "o"})
    with pytest.raises(ConfigError, match="use_unsloth"):
        config_from_dict({"llm_name_or_path": "x", "dataset": "d", "output_dir": "o", "use_unsloth": True})
    with pytest.raises(ConfigError, match="warmup_ratio"):
        config_from_dict({"llm_name_or_path": "x", "dataset": "d", "output_dir": "o", "warmup_ratio": 1.5})
    with pytest.raises(ConfigError, match="vision_mode"):
        config_from_dict({"llm_name_or_path": "x", "dataset": "d", "output_dir": "o", "vision_mode": "clip"})


def test_renamed_and_overrides(tmp_path):
    cfg = config_from_dict({"llm_name_or_path": "x", "dataset": "d", "output_dir": "o", "no_cuda": True,
                            "evaluation_strategy": "steps"})
    assert cfg.training["use_cpu"] is True and cfg.training["eval_strategy"] == "steps"
    assert parse_overrides(["a=1", "b=x", "c=[1, 2]", "d=true"]) == {"a": 1, "b": "x", "c": [1, 2], "d": True}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["oops"])
    p = tmp_path / "c.yaml"
    p.write_text("llm_name_or_path: x\ndataset: d\noutput_dir: o\nlearning_rate: 1.0e-3\n")
    assert load_config(p, ["learning_rate=0.5"]).training["learning_rate"] == 0.5


def test_config_reference_documents_every_field():
    ref = config_reference()
    for key in ("image_seq_length", "patches_per_wsi", "lora_target", "do_sanity_check", "skip_invalid"):
        assert f"`{key}`" in ref
    assert "| `gamma_min` | `1.0` |" in ref


def test_readme_config_reference_is_current():
    from wsi_llava.docs import render

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert render(readme) == readme, "README config reference is stale: run `python -m wsi_llava.docs README.md`"


def test_override_words_stay_strings_for_string_keys(tmp_path):
    """YAML 1.1 reads no/yes/on/off as booleans; for keys that are not booleans they are the strings."""
    assert parse_overrides(["save_strategy=no", "eval_strategy=no", "evaluation_strategy=no", "lr_scheduler_type=off",
                            "split=yes", "resume_from_checkpoint=yes"]) == {
        "save_strategy": "no", "eval_strategy": "no", "evaluation_strategy": "no", "lr_scheduler_type": "off",
        "split": "yes", "resume_from_checkpoint": "yes"}
    # booleans stay booleans; true/false are booleans everywhere; unknown keys as YAML says
    assert parse_overrides(["plot_loss=no", "bf16=off", "save_strategy=false", "whatever=yes", "use_cpu=yes"]) == {
        "plot_loss": False, "bf16": False, "save_strategy": False, "whatever": True, "use_cpu": True}
    with pytest.raises(ConfigError, match="not a valid YAML value"):
        parse_overrides(["learning_rate=[1, 2"])
    p = tmp_path / "c.yaml"
    p.write_text("llm_name_or_path: x\ndataset: d\noutput_dir: o\n")
    cfg = load_config(p, ["save_strategy=no", "eval_strategy=no"])
    from transformers import TrainingArguments

    args = TrainingArguments(**cfg.training)  # was: "False is not a valid IntervalStrategy"
    assert args.save_strategy == "no" and args.eval_strategy == "no"


def test_an_empty_weights_path_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("llm_name_or_path: x\ndataset: d\noutput_dir: o\nvision_mode: wsi\n")
    with pytest.raises(ConfigError, match=r"c.yaml: vision_tower is empty; give the slide-encoder weights file"):
        load_config(p, ["vision_tower="])
    with pytest.raises(ConfigError, match=r"projector_path is empty"):
        load_config(p, ["projector_path=  "])
    with pytest.raises(ConfigError, match=r"vision_tower is empty"):
        config_from_dict({"llm_name_or_path": "x", "dataset": "d", "output_dir": "o", "vision_tower": ""})
    assert load_config(p).model.vision_tower is None  # absent: a random encoder, as documented (tests)
    assert load_config(p, ["system_prompt="]).model.system_prompt is None  # other keys: empty = unset


def test_yaml_file_words_stay_strings_for_string_keys(tmp_path):
    """In a config FILE too, YAML 1.1's no/yes/on/off are the words for string or enum keys
    (``save_strategy: no`` was ``False``: "False is not a valid IntervalStrategy"); booleans stay booleans."""
    from transformers import TrainingArguments

    p = tmp_path / "c.yaml"
    p.write_text("llm_name_or_path: x\ndataset: d\noutput_dir: o\nsave_strategy: no\neval_strategy: No\n"
                 "logging_strategy: 'no'\nevaluation_strategy: off\nlr_scheduler_type: linear\n"
                 "plot_loss: yes\nbf16: off\nuse_cpu: on\nskip_invalid: no\nsplit: yes\n"
                 "resume_from_checkpoint: yes\ndo_sanity_check: false\n"
                 "vision_config: {flag: yes}\n")
    cfg = load_config(p)
    t = cfg.training
    assert t["save_strategy"] == "no" and t["eval_strategy"] == "No" and t["logging_strategy"] == "no"
    assert t["resume_from_checkpoint"] == "yes" and t["bf16"] is False and t["use_cpu"] is True
    assert cfg.finetuning.plot_loss is True and cfg.data.skip_invalid is False and cfg.data.split == "yes"
    assert cfg.finetuning.do_sanity_check is False
    assert cfg.model.vision_config == {"flag": True}  # nested values: YAML as written
    # evaluation_strategy (renamed) stays behind the explicit eval_strategy
    p.write_text("llm_name_or_path: x\ndataset: d\noutput_dir: o\nsave_strategy: no\nevaluation_strategy: no\n"
                 "logging_strategy: no\nuse_cpu: yes\n")
    args = TrainingArguments(**load_config(p).training)  # was: "False is not a valid IntervalStrategy"
    assert args.save_strategy == "no" and args.eval_strategy == "no" and args.logging_strategy == "no"
    # true/false written for a string key stay booleans (as on the command line)
    p.write_text("llm_name_or_path: x\ndataset: d\noutput_dir: o\nsave_strategy: false\n")
    assert load_config(p).training["save_strategy"] is False


def test_vision_mode_roi_is_the_tile_feature_model():
    """``vision_mode: roi`` (tile features of ROI images from encode-roi) is ``none`` for the model, or
    ``wsi`` with a vision_tower; anything else is still refused naming the choices."""
    base = {"llm_name_or_path": "x", "dataset": "d", "output_dir": "o"}
    assert config_from_dict({**base, "vision_mode": "roi"}).model.vision_mode == "none"
    assert config_from_dict({**base, "vision_mode": "roi", "vision_tower": "t.pth"}).model.vision_mode == "wsi"
    with pytest.raises(ConfigError, match="'roi'"):
        config_from_dict({**base, "vision_mode": "image"})


def test_select_options_are_checked_when_the_file_is_loaded(tmp_path):
    """A misspelled selector option fails at load naming the file, not with a TypeError at the first step."""
    p = tmp_path / "c.yaml"
    p.write_text("llm_name_or_path: x\ndataset: d\noutput_dir: o\nvision_feature_select_mode: prumerge\n"
                 "select_options: {merge_neighbour: 8}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: select_options: unknown key 'merge_neighbour'; "
                                          r"did you mean 'merge_neighbours'\?") as err:
        load_config(p)
    assert isinstance(err.value, WsiLlavaError)
    with pytest.raises(ConfigError, match=r"c\.yaml: select_options: merge_neighbours must be an int, got '8'"):
        load_config(p, ["select_options={merge_neighbours: '8'}"])
    with pytest.raises(ConfigError, match=r"select_options: expected a mapping"):
        load_config(p, ["select_options=[1, 2]"])
    ok = load_config(p, ["select_options={merge_neighbours: 8, budget: adaptive}"])
    assert ok.model.select_options == {"merge_neighbours": 8, "budget": "adaptive"}


def test_keys_are_parsed_by_hf_argument_parser_into_the_argument_dataclasses(monkeypatch):
    from transformers import HfArgumentParser

    calls = []
    real = HfArgumentParser.parse_dict

    def spy(self, args, allow_extra_keys=False):
        calls.append(dict(args))
        return real(self, args, allow_extra_keys=allow_extra_keys)

    monkeypatch.setattr(HfArgumentParser, "parse_dict", spy)
    cfg = config_from_dict({"llm_name_or_path": "x", "dataset": "d", "output_dir": "o", "lora_rank": 4,
                            "text_max_length": 9, "learning_rate": 0.1, "mm_use_im_start_end": False})
    assert calls == [{"llm_name_or_path": "x", "dataset": "d", "lora_rank": 4, "text_max_length": 9}]
    assert cfg.finetuning.lora_rank == 4 and cfg.contrastive.text_max_length == 9
    assert cfg.training == {"output_dir": "o", "learning_rate": 0.1}  # the dead key is dropped


def test_dialect_layer_renames_and_drops_only():
    raw, dead = translate_dialect({"evaluation_strategy": "steps", "no_cuda": True, "warmup_ratio": 0.1,
                                   "model_name_or_path": "custom_llava", "mm_use_im_patch_token": False,
                                   "lora_rank": 4})
    assert raw == {"eval_strategy": "steps", "use_cpu": True, "warmup_steps": 0.1, "lora_rank": 4}
    assert dead == ["mm_use_im_patch_token"]
    assert translate_dialect({"eval_strategy": "no", "evaluation_strategy": "steps"})[0] == {"eval_strategy": "no"}


def test_relative_paths_resolve_against_the_working_directory_not_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "run").mkdir()
    p = tmp_path / "cfgs" / "c.yaml"
    p.write_text("llm_name_or_path: lm\ndataset: d\noutput_dir: o\n")
    monkeypatch.chdir(tmp_path / "run")
    cfg = load_config(p)
    assert cfg.base_dir == (tmp_path / "run").resolve()
    assert cfg.resolve(cfg.model.llm_name_or_path) == str((tmp_path / "run" / "lm").resolve())
    assert cfg.resolve("") is None and cfg.resolve("/abs/x") == "/abs/x"


def test_config_is_the_lowest_layer_and_the_default_system_prompt_is_resolved_by_data():
    import subprocess
    import sys

    code = ("import sys, wsi_llava.config; bad = sorted(m for m in sys.modules if m.startswith('wsi_llava.') "
            "and m.split('.')[1] not in ('arguments', 'config', 'errors', 'select_options')); print(bad); sys.exit(bool(bad))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    from wsi_llava.data.prompts import DEFAULT_SYSTEM_PROMPT, resolve_system_prompt

    default = config_from_dict({"llm_name_or_path": "x", "dataset": "d", "output_dir": "o"}).model.system_prompt
    assert default == SYSTEM_PROMPT_DEFAULT and resolve_system_prompt(default) == DEFAULT_SYSTEM_PROMPT
    assert resolve_system_prompt("") is None and resolve_system_prompt(None) is None
    assert resolve_system_prompt("Be brief.") == "Be brief."
