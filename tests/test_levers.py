"""bench/levers.py: freezing the first layer groups really removes them from the step, and a tiny run writes its
table with every lever's row; bench/loader.py's passes see every image; bench/fit_phases.py times every training
batch of a real run."""
import torch

from conftest import bench_module


def _levers(): return bench_module("levers")


def test_freeze_groups_skips_their_gradients():
    lv = _levers()
    model = lv.make_model("resnet18")
    labels = lv.freeze_groups(model, "resnet18", 2)
    assert len(labels) == 2 and labels[0].startswith("conv1")  # stem first, in forward order
    lv.make_step(model, 2, 32, bf16=False, channels_last=True)()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1")) for n in frozen)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None for n in frozen)
    assert grads["fc.weight"] is not None and grads["layer4.1.conv2.weight"] is not None


def test_tiny_run_writes_every_row(tmp_path):
    lv = _levers()
    out = tmp_path / "l.md"
    lv.main(["--arch", "resnet18", "--size", "32", "--reps", "1", "--freeze", "2", "--out", str(out)])
    text = out.read_text()
    for row in ("default: batch 32", "batch 16", "batch 64", "1 thread", "first 2 layer groups frozen (conv1"):
        assert row in text
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert ("depthwise convolutions in fp32" in text) == bf16  # a row only where autocast runs in bf16


def test_depthwise_convolutions_leave_autocast():
    lv = _levers()
    model = lv.make_model("mobilenetv3_small_050")
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert lv.depthwise_in_fp32(model) == len(depthwise) > 0
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o: seen.append((mod.groups > 1, o.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16): model(torch.randn(2, 3, 64, 64))
    assert {d for dw, d in seen if dw} == {torch.float32}
    assert {d for dw, d in seen if not dw} == {torch.bfloat16}  # the others stay under autocast


def test_loader_passes_count_every_image(tiny_data):
    rows = bench_module("loader").main(["resnet18_head", "--data", str(tiny_data), "--passes", "1",
                                        "--set", "size=32", "--set", "bs=5", "--set", "pretrained=false"])
    train, valid = rows
    assert train[0] == "train" and train[1] == 2 * 12  # 24 % 5 = 4: the library drops a last batch of one image only
    assert valid == ("valid", 2 * 6, valid[2]) and valid[2] > 0


def test_fit_phases_times_every_training_batch(tiny_data, tmp_path):
    out = tmp_path / "phases.md"
    timer = bench_module("fit_phases").main(["resnet18_full", "--data", str(tiny_data), "--out", str(out),
                                             "--set", "size=32", "--set", "bs=5", "--set", "pretrained=false"])
    assert timer.images == 2 * 12 and timer.batches == 5  # 24 images at batch 5: the last batch keeps its 4
    assert set(timer.seconds) == {"load", "forward", "loss", "backward", "step", "after"}
    assert all(s > 0 for s in timer.seconds.values())
    text = out.read_text()
    assert "| backward |" in text and "epochs=1, tta=false, size=32, bs=5, pretrained=false" in text
