"""model/configuration.py: the slide encoder's config as a sub-config of WsiLlavaConfig (attribute access,
nested in config.json, old plain-dict folders still load), and the checks made when a config is built."""

from __future__ import annotations

import json

import pytest
import torch

from wsi_llava.config import ConfigError, ModelArguments, arguments_for
from wsi_llava.errors import WsiLlavaError
from wsi_llava.model.configuration import SlideEncoderConfig, WsiLlavaConfig
from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration, load_wsi_llava

ENC = dict(embed_dim=16, depth=1, num_heads=2, segment_lengths=[8, 16], dilations=[1, 2])
TEXT = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=64)


def test_vision_config_is_a_slide_encoder_config_with_attribute_access():
    cfg = WsiLlavaConfig(text_config=TEXT, vision_mode="wsi", vision_config=dict(in_dim=12, **ENC), mm_hidden_size=16)
    assert isinstance(cfg.vision_config, SlideEncoderConfig)
    assert cfg.vision_config.in_dim == 12 and cfg.vision_config.segment_lengths == (8, 16)
    assert cfg.feature_dim == 12
    assert WsiLlavaConfig.sub_configs == {"text_config": cfg.sub_configs["text_config"],
                                          "vision_config": SlideEncoderConfig}
    none = WsiLlavaConfig(text_config=TEXT, mm_hidden_size=24)
    assert isinstance(none.vision_config, SlideEncoderConfig) and none.feature_dim == 24


def test_config_json_nests_the_encoder_config_and_round_trips(tmp_path):
    cfg = WsiLlavaConfig(text_config=TEXT, vision_mode="wsi", vision_config=dict(in_dim=12, **ENC), mm_hidden_size=16,
                         select_options={"budget": "adaptive"})
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision_config"]["model_type"] == SlideEncoderConfig.model_type
    assert {k: saved["vision_config"][k] for k in ENC} == ENC and saved["vision_config"]["in_dim"] == 12
    again = WsiLlavaConfig.from_pretrained(tmp_path)
    assert again.vision_config.architecture() == cfg.vision_config.architecture()
    assert again.select_options == {"budget": "adaptive"}


def test_a_folder_saved_with_a_plain_dict_vision_config_still_loads(tiny_llm, tmp_path):
    torch.manual_seed(0)
    model, tok = WsiLlavaForConditionalGeneration.from_llm(tiny_llm, vision_mode="wsi", mm_hidden_size=16,
                                                           vision_config=dict(in_dim=16, **ENC), image_seq_length=4)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["vision_config"] = model.config.vision_config.architecture()  # as folders saved before: no model_type
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded, _ = load_wsi_llava(tmp_path)
    assert isinstance(loaded.config.vision_config, SlideEncoderConfig)
    assert loaded.config.vision_config.architecture() == model.config.vision_config.architecture()
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_select_options_are_checked_when_the_config_is_built():
    with pytest.raises(ConfigError, match="select_options: unknown key 'merge_neighbour'; "
                                          "did you mean 'merge_neighbours'") as err:
        WsiLlavaConfig(text_config=TEXT, select_options={"merge_neighbour": 8})
    assert isinstance(err.value, WsiLlavaError)
    with pytest.raises(ConfigError, match="select_options: similarity_weighting must be a bool"):
        WsiLlavaConfig(text_config=TEXT, select_options={"similarity_weighting": "yes"})
    with pytest.raises(ConfigError, match="select_options: SelectOptions.budget must be 'fixed' or 'adaptive'"):
        WsiLlavaConfig(text_config=TEXT, select_options={"budget": "sometimes"})


def test_a_saved_config_with_a_bad_select_option_names_its_file(tmp_path):
    WsiLlavaConfig(text_config=TEXT).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["select_options"] = {"merge_neighbors": 4}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"config\.json: select_options: unknown key 'merge_neighbors'"):
        WsiLlavaConfig.from_pretrained(tmp_path)


def test_unknown_vision_config_keys_are_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"vision_config: unknown key\(s\) 'embed_dm' \(did you mean 'embed_dim'\?\)"):
        WsiLlavaConfig(text_config=TEXT, vision_mode="wsi", vision_config={"embed_dm": 16})
    with pytest.raises(TypeError, match="unknown SlideEncoderConfig field"):
        SlideEncoderConfig.from_fields({"num_head": 4})


def test_architecture_is_the_encoders_own_fields_json_ready():
    arch = SlideEncoderConfig(in_dim=12, **ENC).architecture()
    assert list(arch) == list(SlideEncoderConfig.field_names())
    assert arch["segment_lengths"] == [8, 16] and arch["in_dim"] == 12 and "id2label" not in arch
    assert json.loads(json.dumps(arch)) == arch


def test_arguments_for_maps_argument_fields_by_name_without_a_hand_list():
    m = ModelArguments(vision_mode="wsi", image_seq_length=9, use_cls_token=True, select_options={"order": "score"},
                       gamma_max=2.0, vision_feature_select_mode="prumerge")
    kw = arguments_for(WsiLlavaConfig, m, mm_hidden_size=16)
    assert kw["image_seq_length"] == 9 and kw["use_cls_token"] and kw["gamma_max"] == 2.0
    assert kw["select_options"] == {"order": "score"} and kw["mm_hidden_size"] == 16
    assert "llm_name_or_path" not in kw and "vision_tower" not in kw  # not WsiLlavaConfig fields
    cfg = WsiLlavaConfig(text_config=TEXT, **kw)
    assert cfg.vision_feature_select_mode == "prumerge" and cfg.num_image_tokens == 10
    with pytest.raises(TypeError, match="no field"):
        arguments_for(WsiLlavaConfig, m, not_a_field=1)


def test_slide_text_config_is_built_from_contrastive_arguments_by_name():
    from dataclasses import fields

    from wsi_llava.config import ContrastiveArguments
    from wsi_llava.model.slide_text import SlideTextConfig

    shared = {f.name for f in fields(SlideTextConfig)} - {f.name for f in fields(ContrastiveArguments)}
    assert shared == {"freeze_slide_tower"}  # the one field whose argument has another name (freeze_vision_tower)
    c = ContrastiveArguments(slide_pool="mean", projection_dim=8, init_temperature=0.1, freeze_text_tower=True,
                             gather_across_processes=False)
    heads = SlideTextConfig(**arguments_for(SlideTextConfig, c, freeze_slide_tower=True))
    assert heads == SlideTextConfig(slide_pool="mean", projection_dim=8, init_temperature=0.1,
                                    max_logit_scale=c.max_logit_scale, freeze_slide_tower=True,
                                    freeze_text_tower=True, gather_across_processes=False)


def test_stage2_build_refuses_a_misspelled_vision_config_key_naming_the_config(tiny_llm):
    from wsi_llava.config import config_from_dict
    from wsi_llava.train.run import build_model

    cfg = config_from_dict({"llm_name_or_path": str(tiny_llm), "dataset": "d", "output_dir": "o", "vision_mode": "wsi",
                            "vision_config": {**ENC, "embed_dm": 16}}, source="s2.yaml")
    with pytest.raises(ConfigError, match=r"s2\.yaml: vision_config: unknown key\(s\) 'embed_dm' "
                                          r"\(did you mean 'embed_dim'\?\)"):
        build_model(cfg, 16)
