"""zoo.segment: a mask for a user's image of any size, prepared as the training data were (zoo.predict)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from zoo.data import get_dataset_info, prepare_input, preparation
from zoo.models._base import ZooSegmenter
from zoo.predict import _starts

SEGMENTERS = [n for n in zoo.list_models() if zoo.model_info(n)["task"] == "segmentation"]


def _cfg(model, dataset: str, resize: int | None = None) -> dict:
    """The preparation block a run of ``model`` on ``dataset`` records in its sidecar."""
    return preparation(get_dataset_info(dataset), {"resize": resize}, model.in_chans)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    args = {"in_chans": 1} if zoo.model_info(name)["input_size"][0] != 1 else {}
    return zoo.create_model(name, **args)


@pytest.mark.parametrize("name", SEGMENTERS)
def test_any_size_gives_a_mask_of_that_size(name):
    model = _model(name)
    cfg = _cfg(model, "isbi2012")
    image = torch.randint(0, 256, (37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mask = zoo.segment(model, image, cfg=cfg)
    assert mask.shape == (37, 53) and mask.dtype == torch.long
    assert 0 <= int(mask.min()) and int(mask.max()) < model.num_classes
    probs = zoo.segment(model, image.numpy(), cfg=cfg, return_probs=True)  # numpy [H, W] as stored
    assert probs.shape == (model.num_classes, 37, 53)
    torch.testing.assert_close(probs.sum(0), torch.ones(37, 53))
    assert torch.equal(probs.argmax(0), mask)


@pytest.mark.parametrize("name", SEGMENTERS)
def test_an_image_of_the_training_size_is_one_forward_pass(name):
    """What zoo.evaluate computes on a test image: the prepared image through the exported model, argmax."""
    model = _model(name)
    m = model.size_multiple
    cfg = _cfg(model, "isbi2012", resize=2 * m if m >= 16 else 32)
    size = cfg["input_size"][1]
    images = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = zoo.export(model)(prepare_input(images, cfg)).argmax(1)
    assert torch.equal(zoo.segment(model, images, cfg=cfg), expected)


class _Pointwise(ZooSegmenter):
    """A segmenter whose logits at a pixel depend on that pixel alone (a 1x1 convolution), so that tiling must not
    change them: any window, padding or blending error shows."""

    def __init__(self):
        super().__init__()
        self.in_chans, self.num_classes, self.size_multiple = 1, 3, 8
        self.head = nn.Conv2d(1, 3, 1)

    def forward_features(self, x):
        return x


def test_tiles_blend_to_the_whole_image_result():
    torch.manual_seed(0)
    model = _Pointwise()
    cfg = {**_cfg(model, "isbi2012"), "num_classes": 3}
    image = torch.rand(1, 101, 70, generator=torch.Generator().manual_seed(3))
    whole = zoo.segment(model, image, cfg=cfg, return_probs=True)  # 101x70 < 512: one pass
    for tile, overlap in [(32, 0.25), (16, 0.5), (40, 0.0)]:
        tiled = zoo.segment(model, image, cfg=cfg, tile=tile, overlap=overlap, return_probs=True)
        torch.testing.assert_close(tiled, whole)


@pytest.mark.parametrize("length,tile,stride", [(100, 32, 24), (32, 32, 8), (33, 32, 32), (10, 32, 24),
                                                (257, 64, 1)])
def test_windows_cover_every_pixel(length, tile, stride):
    starts = _starts(length, tile, stride)
    covered = torch.zeros(max(length, tile), dtype=torch.bool)
    for s in starts:
        assert 0 <= s and (s + tile <= length or length <= tile)
        covered[s:s + tile] = True
    assert covered[:length].all()
    assert starts == sorted(set(starts))


def test_a_large_image_is_segmented_in_tiles_with_groupnorm_models():
    """A real U-Net on an image 3x its tile: the mask has the image's size; the same model given the whole image in
    one pass differs (GroupNorm's statistics over the whole image), which is why windows keep the training size."""
    model = _model("test-unet-w4")
    cfg = _cfg(model, "isbi2012")
    image = torch.rand(1, 96, 100, generator=torch.Generator().manual_seed(4))
    tiled = zoo.segment(model, image, cfg=cfg, tile=32, return_probs=True)
    whole = zoo.segment(model, image, cfg=cfg, tile=512, return_probs=True)
    assert tiled.shape == whole.shape == (2, 96, 100)
    assert not torch.allclose(tiled, whole)


def test_resized_training_resizes_the_image_and_the_mask_back():
    model = _model("test-unet-w4")
    model = zoo.create_model("test-unet-w4", in_chans=3)
    cfg = _cfg(model, "weizmann-horse", resize=32)
    rgb = np.random.default_rng(5).integers(0, 256, (90, 130, 3), dtype=np.uint8)  # HWC, as PIL gives it
    mask = zoo.segment(model, rgb, cfg=cfg)
    assert mask.shape == (90, 130)
    small = torch.nn.functional.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255, size=(32, 32),
                                            mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        logits = zoo.export(model)((small - torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
                                   / torch.tensor(cfg["std"]).view(1, 3, 1, 1))
    expected = torch.nn.functional.interpolate(logits, size=(90, 130), mode="bilinear", align_corners=False)
    assert torch.equal(mask, expected.argmax(1)[0])


def test_list_of_sizes_and_model_left_as_it_was():
    model = _model("test-unet-w4").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = zoo.segment(model, [torch.rand(20, 30), torch.rand(1, 45, 17)], cfg=_cfg(model, "isbi2012"))
    assert [tuple(m.shape) for m in masks] == [(20, 30), (45, 17)]
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_input_says_what_to_do():
    model = _model("test-unet-w4")
    cfg = _cfg(model, "isbi2012")
    with pytest.raises(ValueError, match="pretrained=True"):
        zoo.segment(model, torch.rand(32, 32))  # no preparation: neither pretrained nor cfg=
    with pytest.raises(TypeError, match="segmentation model"):
        zoo.segment(zoo.create_model("test-wrn10-1"), torch.rand(3, 32, 32), cfg=cfg)
    with pytest.raises(ValueError, match="permute"):
        zoo.segment(model, torch.rand(32, 32, 3), cfg=cfg)  # an HWC tensor
    with pytest.raises(ValueError, match="NaN|\\[0, 1\\]"):
        zoo.segment(model, torch.full((32, 32), float("nan")), cfg=cfg)
    with pytest.raises(ValueError, match="channels"):
        zoo.segment(model, torch.rand(2, 32, 32), cfg=cfg)
    with pytest.raises(ValueError, match="tile"):
        zoo.segment(model, torch.rand(32, 32), cfg=cfg, tile=0)
    with pytest.raises(ValueError, match="overlap"):
        zoo.segment(model, torch.rand(32, 32), cfg=cfg, overlap=1.0)
    with pytest.raises(ValueError, match="no images"):
        zoo.segment(model, torch.rand(0, 1, 32, 32), cfg=cfg)
