"""The shipped DeepSpeed ZeRO-2/3 and Accelerate FSDP configs (issue #17): they parse, and a `deepspeed:`
key reaches `TrainingArguments` as the absolute path of the JSON file (DeepSpeed itself needs CUDA to
build and is not installed here; the GPU check runs it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from wsi_llava.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,stage", [("ds_zero2.json", 2), ("ds_zero3.json", 3)])
def test_deepspeed_configs_parse_and_leave_batch_sizes_to_the_trainer(name, stage):
    ds = json.loads((REPO / "configs" / name).read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert {ds[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")} \
        == {"auto"}


def test_accelerate_fsdp_config_is_full_shard_with_a_documented_state_dict_type():
    text = (REPO / "configs" / "accelerate_fsdp.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["distributed_type"] == "FSDP"
    assert cfg["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert cfg["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and "SHARDED_STATE_DICT" in text
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(REPO / "configs" / "accelerate_fsdp.yaml"))
    assert str(loaded.distributed_type).endswith("FSDP") and loaded.num_processes == 2


def _config(tmp_path: Path, tiny_llm, cohort, **kw) -> Path:
    cfg = {"llm_name_or_path": str(tiny_llm), "dataset": str(cohort.train_csv), "stage": "sft",
           "output_dir": str(tmp_path / "run"), "report_to": "none", **kw}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", ["ds_zero2.json", "ds_zero3.json"])
def test_deepspeed_key_reaches_training_arguments(name, tmp_path, tiny_llm, cohort, monkeypatch):
    monkeypatch.chdir(REPO)  # relative paths resolve against the working directory, as in LLaMA-Factory
    cfg = load_config(_config(tmp_path, tiny_llm, cohort, deepspeed=f"configs/{name}"))
    assert cfg.training["deepspeed"] == str(REPO / "configs" / name)
    other = "ds_zero3.json" if name == "ds_zero2.json" else "ds_zero2.json"
    assert load_config(_config(tmp_path, tiny_llm, cohort), [f"deepspeed=configs/{other}"]).training["deepspeed"] \
        == str(REPO / "configs" / other)
    from transformers import TrainingArguments

    training = dict(cfg.training)
    if importlib.util.find_spec("deepspeed") is None:
        # TrainingArguments hands the file to the DeepSpeed integration, which needs the package
        with pytest.raises(Exception, match="deepspeed"):
            TrainingArguments(remove_unused_columns=False, label_names=["labels"], **training)
    else:  # pragma: no cover - only where DeepSpeed is installed (GPU machines)
        args = TrainingArguments(remove_unused_columns=False, label_names=["labels"], **training)
        assert args.deepspeed == str(REPO / "configs" / name)
        assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == int(name[7])


def test_missing_deepspeed_file_is_a_config_error(tmp_path, tiny_llm, cohort):
    with pytest.raises(ConfigError, match="deepspeed: .*nope.json not found"):
        load_config(_config(tmp_path, tiny_llm, cohort, deepspeed=str(tmp_path / "nope.json")))
