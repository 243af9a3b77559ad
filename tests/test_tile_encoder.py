"""Tile encoders: published architectures on the meta device, strict local loading, preprocessing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from wsi_llava.model.tile_encoder import (IMAGENET_MEAN, IMAGENET_STD, Preprocess, TileEncoderError,
                                          build_tile_encoder, save_tile_weights)

TINY = dict(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=2, init_values=1e-5)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_gigapath_on_meta_device():
    with torch.device("meta"):
        enc = build_tile_encoder("gigapath")
    assert 1.10e9 <= _params(enc) <= 1.16e9
    assert _params(enc) == 1_134_953_984  # the count Prov-GigaPath's demo prints for its tile encoder
    assert enc.embed_dim == 1536
    keys = set(enc.state_dict_keys())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.39.ls2.gamma", "norm.weight",
            "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.attn.qkv.weight"} <= keys
    sd = enc.backbone.state_dict()
    assert tuple(sd["blocks.0.mlp.fc1.weight"].shape) == (8192, 1536)  # packed SwiGLU
    assert tuple(sd["blocks.0.mlp.fc2.weight"].shape) == (1536, 4096)
    assert tuple(sd["pos_embed"].shape) == (1, 197, 1536)
    assert tuple(sd["patch_embed.proj.weight"].shape) == (1536, 3, 16, 16)
    assert enc.preprocess == Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert all(p.is_meta for p in enc.parameters())


def test_uni_on_meta_device():
    with torch.device("meta"):
        enc = build_tile_encoder("uni")
    assert 0.300e9 <= _params(enc) <= 0.310e9
    assert enc.embed_dim == 1024
    keys = set(enc.state_dict_keys())
    assert {"blocks.23.ls1.gamma", "blocks.23.mlp.fc2.bias", "norm.bias"} <= keys
    assert "blocks.24.norm1.weight" not in keys
    assert enc.preprocess.resize == enc.preprocess.crop == 224
    assert enc.backbone.cfg.dynamic_img_size


def test_tiny_vit_round_trip_is_bit_exact(tmp_path):
    enc = build_tile_encoder("vit", **TINY)
    assert enc.embed_dim == 24 and not any(p.requires_grad for p in enc.parameters())
    path = tmp_path / "tiny.safetensors"
    save_tile_weights(enc, path)
    back = build_tile_encoder("vit", weights=path, **TINY)
    for (k, a), (k2, b) in zip(enc.backbone.state_dict().items(), back.backbone.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(enc(x), back(x))
    assert enc(x).shape == (3, 24)
    # a .bin file read with weights_only=True loads the same
    bin_path = tmp_path / "pytorch_model.bin"
    torch.save(enc.backbone.state_dict(), bin_path)
    assert torch.equal(build_tile_encoder("vit", weights=bin_path, **TINY)(x), enc(x))
    # onto a meta-built encoder: the weights are assigned
    with torch.device("meta"):
        meta = build_tile_encoder("vit", **TINY)
    from wsi_llava.model.tile_encoder import load_tile_weights

    load_tile_weights(meta, path)
    assert torch.equal(meta(x), enc(x))


def test_wrong_keys_are_all_listed(tmp_path):
    enc = build_tile_encoder("vit", **TINY)
    sd = dict(enc.backbone.state_dict())
    sd.pop("norm.weight")
    sd["head.weight"] = torch.zeros(10, 24)
    sd["cls_token"] = torch.zeros(1, 1, 25)
    path = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(path))
    with pytest.raises(TileEncoderError) as e:
        build_tile_encoder("vit", weights=path, **TINY)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys (1)" in msg and "norm.weight" in msg
    assert "unexpected keys (1)" in msg and "head.weight" in msg
    assert "shape mismatches (1)" in msg and "cls_token: weights (1, 1, 25) vs model (1, 1, 24)" in msg


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickle_with_a_class_is_refused(tmp_path, capsys):
    path = tmp_path / "pytorch_model.bin"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": Payload()}, f, protocol=2)
    with pytest.raises(TileEncoderError, match="weights_only=True"):
        build_tile_encoder("vit", weights=path, **TINY)
    assert "unpickled!" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        build_tile_encoder("vit", weights=tmp_path / "absent.safetensors", **TINY)


def test_unknown_names_and_overrides():
    with pytest.raises(TileEncoderError, match="unknown tile encoder"):
        build_tile_encoder("conch")
    with pytest.raises(TileEncoderError, match="unknown override"):
        build_tile_encoder("vit", depht=2)


def test_dynamic_img_size():
    enc = build_tile_encoder("vit", dynamic_img_size=True, **TINY)
    assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 24)
    with pytest.raises(TileEncoderError, match="dynamic_img_size"):
        build_tile_encoder("vit", **TINY)(torch.randn(1, 3, 48, 48))


def _reference(image, resize, crop, mean, std):
    """torchvision's Resize(int, BICUBIC) → CenterCrop → ToTensor → Normalize, written out with PIL."""
    from PIL import Image

    w, h = image.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    image = image.resize(size, Image.BICUBIC)
    w, h = image.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_preprocessing_matches_the_published_pipeline():
    from PIL import Image

    rng = np.random.default_rng(0)
    pre = build_tile_encoder("vit", **TINY).preprocess
    assert pre == Preprocess(resize=32, crop=32)  # img_size without resize/crop sets both
    pre = Preprocess(resize=256, crop=224)
    for h, w in [(300, 400), (256, 256), (512, 300)]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = pre(arr)
        want = _reference(Image.fromarray(arr), 256, 224, IMAGENET_MEAN, IMAGENET_STD)
        assert got.shape == (3, 224, 224)
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.allclose(pre(Image.fromarray(arr)), got)
    # the batch path (tiles cut at tile_size) equals the per-image pipeline
    tiles = torch.from_numpy(rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8))
    batch = pre.batch(tiles)
    for i in range(4):
        assert torch.allclose(batch[i], pre(tiles[i].numpy()), atol=1e-6)


def test_preprocessing_equals_timms_own_transform():
    try:
        import timm
        from timm.data import create_transform, resolve_data_config
    except Exception as e:  # noqa: BLE001 - torchvision beside a CPU torch fails with RuntimeError
        pytest.skip(f"timm does not import here ({type(e).__name__}); see docs/tile_encoders.md")
    from PIL import Image

    enc = build_tile_encoder("timm:vit_tiny_patch16_224")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    transform = create_transform(**resolve_data_config({}, model=model))
    arr = np.random.default_rng(1).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    assert torch.allclose(enc.preprocess(arr), transform(Image.fromarray(arr)), atol=1e-6)
    # and the in-house ViT holds the same weights under the same names with the same output
    vit = build_tile_encoder("vit", img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3,
                             weights=model.state_dict())
    x = torch.randn(2, 3, 224, 224)
    assert torch.allclose(vit(x), model.eval()(x), atol=1e-5)


def test_timm_vit_without_timm_uses_the_architecture_table(tmp_path):
    """timm:<plain ViT> builds the in-house ViT with timm's sizes, key names and default preprocessing."""
    import wsi_llava.model.tile_encoder as te

    if te._timm()[0] is not None:
        pytest.skip("timm imports here: timm:<arch> is built by timm itself")
    with torch.device("meta"):
        enc = build_tile_encoder("timm:vit_tiny_patch16_224")
    assert _params(enc) == 5_524_416  # timm's vit_tiny_patch16_224 with num_classes=0
    assert enc.embed_dim == 192
    assert enc.preprocess == Preprocess(resize=248, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with torch.device("meta"):
        big = build_tile_encoder("timm:vit_base_patch16_384")
    assert (big.embed_dim, big.backbone.cfg.img_size, big.preprocess.resize) == (768, 384, 384)
    with torch.device("meta"):
        dino = build_tile_encoder("timm:vit_small_patch8_224")
    assert dino.preprocess.mean == IMAGENET_MEAN and dino.backbone.cfg.patch_size == 8
    # a timm-keyed state dict loads strictly; the saved name and config come back with the same name given
    tiny = build_tile_encoder("timm:vit_tiny_patch16_224", depth=2)
    path = tmp_path / "w.safetensors"
    save_tile_weights(tiny, path)
    from wsi_llava.model.tile_encoder import load_tile_encoder

    back = load_tile_encoder(path, "timm:vit_tiny_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(back(x), tiny(x)) and len(back.backbone.blocks) == 2
    with pytest.raises(TileEncoderError, match="vit_tiny_patch16_224"):
        build_tile_encoder("timm:convnext_tiny")
    with pytest.raises(TileEncoderError, match="num_classes"):
        build_tile_encoder("timm:vit_tiny_patch16_224", num_classes=10)


def test_timm_vit_table_matches_timm():
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - torchvision beside a CPU torch fails with RuntimeError
        pytest.skip(f"timm does not import here ({type(e).__name__}); see docs/tile_encoders.md")
    from wsi_llava.model.tile_encoder import _timm_vit_spec
    from wsi_llava.model.vit import TIMM_VITS

    for arch in TIMM_VITS:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
        spec = _timm_vit_spec(arch)
        cfg = timm.data.resolve_data_config({}, model=model)
        assert int(cfg["input_size"][-1]) == spec.preprocess.crop, arch
        assert tuple(cfg["mean"]) == spec.preprocess.mean and tuple(cfg["std"]) == spec.preprocess.std, arch
        with torch.device("meta"):
            ours = build_tile_encoder(f"timm:{arch}")  # timm builds it here; compare with the in-house ViT
            from wsi_llava.model.vit import ViT
            vit = ViT(spec.vit)
        assert {k: tuple(v.shape) for k, v in vit.state_dict().items()} == \
               {k: tuple(v.shape) for k, v in model.state_dict().items()}, arch
        assert ours.embed_dim == spec.vit.embed_dim
