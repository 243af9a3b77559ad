"""One precision rule (wsi_llava.precision): half precision only where this machine runs it fast."""

from __future__ import annotations

import logging

import pytest
import torch

from wsi_llava.precision import cpu_half_speed, resolve_precision, training_precision


def slow(dtype):  # an AVX2 CPU: the bf16 matmul runs on the scalar fallback
    return 86.0


def fast(dtype):  # AVX-512 BF16 / AMX
    return 0.6


def test_bf16_on_a_cpu_without_native_bf16_falls_back_with_one_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="wsi_llava.precision"):
        p = resolve_precision("bf16", "cpu", speed_probe=slow)
        again = resolve_precision("bf16", "cpu", speed_probe=slow)
    assert p.name == again.name == "fp32" and p.dtype == torch.float32
    assert "86x" in p.reason and "force" in p.reason
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "running float32" in messages[0]  # said once, not per call


def test_bf16_on_a_cpu_with_native_bf16_is_kept():
    p = resolve_precision("bf16", "cpu", speed_probe=fast)
    assert p.name == "bf16" and p.dtype == torch.bfloat16


def test_force_keeps_bf16_even_where_slow_and_auto_is_fp32_on_cpu():
    assert resolve_precision("bf16", "cpu", force=True, speed_probe=slow).name == "bf16"
    assert resolve_precision("fp16", "cpu", force=True, speed_probe=slow).name == "fp16"
    assert resolve_precision("auto", "cpu", speed_probe=fast).name == "fp32"  # answers do not depend on the CPU
    assert resolve_precision("fp16", "cpu", speed_probe=fast).name == "fp32"
    assert resolve_precision(None, "cpu").name == "fp32"
    with pytest.raises(ValueError, match="unknown"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="explicit"):
        resolve_precision("auto", "cpu", force=True)


def test_training_arguments_follow_the_rule():
    slow_args = training_precision({"bf16": True, "output_dir": "x"}, speed_probe=slow)
    assert slow_args["bf16"] is False and slow_args["fp16"] is False and slow_args["use_cpu"] is True
    fast_args = training_precision({"bf16": True}, speed_probe=fast)
    assert fast_args["bf16"] is True
    forced = training_precision({"bf16": True}, force=True, speed_probe=slow)
    assert forced["bf16"] is True
    assert training_precision({"fp16": True}, speed_probe=fast)["fp16"] is False
    assert "bf16" not in training_precision({}, speed_probe=slow)  # nothing asked, nothing added


def test_the_probe_measures_this_cpu():
    ratio = cpu_half_speed(torch.bfloat16)
    assert ratio > 0
    # the probe is cached per process: the same number again without re-timing
    assert cpu_half_speed(torch.bfloat16) == ratio


# -- inference: chat, predict, serve and encode take the same rule ------------------------------------------


def test_inference_commands_run_in_forced_bf16_and_default_to_fp32(tmp_path, tiny_llm):
    """Every inference command has --precision/--force-precision/--device; bf16 runs the model under autocast."""
    import json

    from wsi_llava import cli
    from wsi_llava.infer.engine import SlideAssistant
    from serve_helpers import tiny_serving_cached

    tiny = tiny_serving_cached(tmp_path / "serve_tiny")
    slide = str(tiny.slides_root / f"{tiny.slide_ids[0]}.h5")
    default = SlideAssistant.from_pretrained(tiny.model_dir, device="cpu")
    assert default.precision.name == "fp32" and default.model.device.type == "cpu"
    forced = SlideAssistant.from_pretrained(tiny.model_dir, precision="bf16", force_precision=True)
    assert forced.precision.name == "bf16"
    with forced.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    s = forced.load(slide)
    (a,) = forced.answer([s], ["What is shown?"])
    assert a.completion_tokens > 0 and a.text  # generation ran under bf16 autocast
    csv = tmp_path / "one.csv"
    csv.write_text(f"h5_path,caption,question,answer,slide_id,dataset\n{slide},,What is shown?,x,s1,d\n")
    for args in (["chat", "--model", str(tiny.model_dir), "--slide", slide, "--question", "What is shown?"],
                 ["predict", "--model", str(tiny.model_dir), "--data", str(csv), "--out", str(tmp_path / "p.jsonl")]):
        assert cli.main(args + ["--precision", "bf16", "--force-precision", "--device", "cpu",
                                "--max-new-tokens", "4"]) == 0
    row = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert row["prediction"] is not None


def test_serve_config_carries_the_precision(tmp_path):
    from wsi_llava.serve.server import SlideServer
    from wsi_llava.serve.config import ServeConfig
    from serve_helpers import tiny_serving_cached

    tiny = tiny_serving_cached(tmp_path / "serve_tiny")
    server = SlideServer(ServeConfig(model=str(tiny.model_dir), slides_root=str(tiny.slides_root), precision="bf16",
                                     force_precision=True, device="cpu"))
    assert server.assistant.precision.name == "bf16"
